"""A published table set beside ours: for every method and metric our mean ± std over seeds, the published value and
the difference, as markdown, JSON and a plot.

    python reproduce.py --benchmark salun --tables-only   # rebuild results/salun_table1.{md,json,png} from the records

compare() takes the summary rows reproduce.py makes of the run records ({"method", "n", "seeds", metric: {"mean",
"std"}}) and the published values (benchmarks.load_published); the rest writes what it returns.
"""
import statistics

from matplotlib.figure import Figure

from .evaluation import markdown_table
from .files import save_figure, write_json, write_text
from .metrics import METRIC_KEYS

# Our summary's key of each published metric, and how ours converts to the published unit.
METRICS = {"UA": ("UA", 1.0), "MIA_efficacy": ("MIA_efficacy", 1.0), "RA": ("RA", 1.0), "TA": ("TA", 1.0),
           "avg_gap": ("avg_gap", 1.0), "RTE_min": ("RTE_s", 1 / 60)}
HEADERS = {"UA": "UA %", "MIA_efficacy": "MIA-eff. %", "RA": "RA %", "TA": "TA %", "avg_gap": "avg. gap",
           "RTE_min": "RTE min"}
PLOTTED = ("UA", "MIA_efficacy", "RA", "TA", "avg_gap")
READING = ("Ours: mean ± sample standard deviation over seeds, each seed its own original model and retrain; "
           "published: mean ± std as the publication gives them. Δ = our mean - the published mean. Our avg. gap is "
           "per seed against that seed's retrain, then averaged; 'gap of our means' is the gap of our metric means to "
           "our retrain's means, as the published avg. gap is computed from its table's means. RTE: minutes of the "
           "unlearning step on our device, not comparable across machines. How to read a difference: "
           "docs/reproducing.md.")


def stat(mean=None, std=None):
    return {"mean": mean, "std": std}


def published_stat(row, key):
    """{"mean", "std"} of a published row's [mean, std] entry (both None when it has none)."""
    mean, std = [*(row.get(key) or []), None, None][:2]
    return stat(mean, std)


def our_stat(row, key):
    """{"mean", "std"} of our summary row for published metric key, in the published unit."""
    ours, scale = METRICS[key]
    value = row.get(ours) or stat()
    return stat(*(None if v is None else v * scale for v in (value["mean"], value["std"])))


def difference(ours, published):
    """ours - published, of the means; None when either is missing."""
    if ours["mean"] is None or published["mean"] is None:
        return None
    return ours["mean"] - published["mean"]


def gap_of_means(row, reference):
    """Mean absolute difference of row's metric means to reference's over UA, MIA-efficacy, RA and TA: the avg. gap
    as a table of means gives it (SalUn's), None when a mean is missing."""
    pairs = [(row[key]["mean"], reference[key]["mean"]) for key in METRIC_KEYS]
    if any(value is None for pair in pairs for value in pair):
        return None
    return statistics.fmean(abs(a - b) for a, b in pairs)


def compare(benchmark, published, summary):
    """Rows of the side-by-side table: the published rows in their order, each with ours where we implement it,
    then our methods the publication has no row for. Each row: {"method", "published_method", "implemented", "n",
    "seeds", metric: {"ours", "published", "difference"}}."""
    names = {"retrain": benchmark.retrain_published,
             **{name: method.published for name, method in benchmark.methods.items() if method.published}}
    ours_by_published = {names[row["method"]]: row for row in summary if row["method"] in names}
    retrain = next((row for row in summary if row["method"] == "retrain"), None)
    ours_by_name = {published: name for name, published in names.items()}
    rows = []
    for entry in published["rows"]:
        ours = ours_by_published.get(entry["method"])
        rows.append(side_by_side(ours_by_name.get(entry["method"]), entry["method"], ours, entry, retrain))
    for row in summary:
        if row["method"] not in names:
            rows.append(side_by_side(row["method"], None, row, None, retrain))
    return rows


def side_by_side(method, published_method, ours, entry, retrain):
    """One row of compare(): method None for a published method we do not implement, published_method None for one
    of ours the publication has no row for; ours None when it has no runs yet."""
    row = {"method": method, "published_method": published_method, "implemented": method is not None,
           "n": ours["n"] if ours else 0, "seeds": ours["seeds"] if ours else [],
           "avg_gap_of_means": gap_of_means(ours, retrain) if ours and retrain else None}
    for key in METRICS:
        mine = our_stat(ours, key) if ours else stat()
        theirs = published_stat(entry, key) if entry else stat()
        row[key] = {"ours": mine, "published": theirs, "difference": difference(mine, theirs)}
    return row


def format_stat(value, digits=2):
    """"mean ± std" of {"mean", "std"} ("mean" alone without a std, "-" without a mean)."""
    if value["mean"] is None:
        return "-"
    text = f"{value['mean']:.{digits}f}"
    return text if value["std"] is None else f"{text} ± {value['std']:.{digits}f}"


def format_difference(value, digits=2):
    return "-" if value is None else f"{value:+.{digits}f}"


def label(row):
    """The row's name: ours (theirs) where they differ, and a mark for a published method we do not implement."""
    if not row["implemented"]:
        given = any(row[key]["published"]["mean"] is not None for key in METRICS)
        return f"{row['published_method']} (published only: not implemented here" + (
            ")" if given else "; its values are not in the source used)")
    if row["published_method"] is None:
        return f"{row['method']} (ours only)"
    if not row["n"]:
        return f"{row['method']} ({row['published_method']}; no runs yet)"
    return row["method"] if row["method"] == row["published_method"] else f"{row['method']} ({row['published_method']})"


def markdown(title, lines, rows, published_name):
    """The side-by-side table as markdown: per metric, ours, theirs and the difference."""
    columns = {"label": "method", "n": "runs"}
    cells = []
    for row in rows:
        gap = row["avg_gap_of_means"]
        cell = {"label": label(row), "n": row["n"], "gap_of_means": "-" if gap is None else f"{gap:.2f}"}
        for key in METRICS:
            cell[f"{key}_ours"] = format_stat(row[key]["ours"])
            cell[f"{key}_published"] = format_stat(row[key]["published"])
            cell[f"{key}_difference"] = format_difference(row[key]["difference"])
        cells.append(cell)
    for key, header in HEADERS.items():
        columns.update({f"{key}_ours": f"{header} ours", f"{key}_published": f"{header} {published_name}",
                        f"{key}_difference": f"{header} Δ"})
        if key == "avg_gap":
            columns["gap_of_means"] = "gap of our means"
    return "\n\n".join([f"# {title}", *lines, markdown_table(cells, columns)]) + "\n"


def write(stem, title, lines, rows, published, extra):
    """stem.md, stem.json (with extra: header, runs, ...) and stem.png; returns the three paths."""
    paths = [stem.with_suffix(suffix) for suffix in (".md", ".json", ".png")]
    write_text(paths[0], markdown(title, lines, rows, published.get("short_name", "published")))
    write_json(paths[1], {"title": title, "notes": lines, "citation": published["citation"],
                          "source": published["source"], "rows": rows, **extra})
    plot(paths[2], title, rows)
    return paths


def plot(path, title, rows):
    """One panel per metric: ours against the published value per method, ±1 std; retrain's published level
    dashed."""
    shown = [row for row in rows if row["implemented"]]
    figure = Figure(figsize=(18, 5.5), layout="constrained")
    for ax, key in zip(figure.subplots(1, len(PLOTTED)).flat, PLOTTED, strict=True):
        names = [label(row).split(" (")[0] for row in shown]
        for offset, side, color in ((-0.2, "ours", "C0"), (0.2, "published", "C1")):
            values = [row[key][side] for row in shown]
            positions = [i + offset for i, value in enumerate(values) if value["mean"] is not None]
            means = [value["mean"] for value in values if value["mean"] is not None]
            errors = [value["std"] or 0 for value in values if value["mean"] is not None]
            ax.bar(positions, means, width=0.4, yerr=errors, capsize=3, color=color,
                   label="ours (mean ± std over seeds)" if side == "ours" else "published (mean ± std)")
        retrain = next((row for row in shown if row["published_method"] and row["method"] == "retrain"), None)
        if retrain and retrain[key]["published"]["mean"] is not None and key != "avg_gap":
            ax.axhline(retrain[key]["published"]["mean"], color="#303030", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(shown)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(HEADERS[key])
        ax.grid(axis="y", alpha=0.3)
    figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=9)
    figure.suptitle(f"{title}\n(dashed: published Retrain, the target)", fontsize=10)
    save_figure(path, figure, dpi=110)
