"""Heavy libraries are imported where they are used: peft (and transformers under it) only where LoRA adapters are
attached, scikit-learn only where the MIA or the probe runs, tensorboard and wandb only under --track. Real
processes, since an import cannot be undone."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("peft", "transformers", "sklearn", "tensorboard", "wandb")
# timm (which torch-pruning imports) imports wandb itself whenever it is installed, for its own optional logging.
THROUGH_TIMM = {"wandb"}
# Runs each (script, flags) given as "script flag flag ..." arguments in this process, as `python script flags` would,
# and prints after each the heavy libraries imported so far.
RUN_AND_LIST = f"""
import contextlib, io, runpy, sys
sys.path.insert(0, {str(ROOT)!r})
for command in sys.argv[1:]:
    script, *flags = command.split()
    sys.argv = [script, *flags]
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path({str(ROOT)!r} + "/" + script, run_name="__main__")
        except SystemExit as stop:
            assert stop.code in (0, None), (command, stop.code)
    print(script, *[name for name in {HEAVY!r} if name in sys.modules])
"""


def heavy_imports(*commands, cwd=ROOT):
    """{script: [heavy libraries in sys.modules after it ran]} for commands run one after another in one process."""
    finished = subprocess.run([sys.executable, "-c", RUN_AND_LIST, *commands], cwd=cwd, capture_output=True, text=True,
                              timeout=600)
    assert finished.returncode == 0, finished.stderr
    return {script: imported for script, *imported in map(str.split, finished.stdout.splitlines())}


def test_help_of_every_script_imports_no_heavy_library():
    scripts = sorted(path.name for path in ROOT.glob("*.py"))
    assert "lora.py" in scripts and "reproduce.py" in scripts
    imported = heavy_imports(*(f"{script} --help" for script in scripts))
    assert imported == {script: [] for script in scripts}


def test_a_method_without_lora_runs_without_peft_and_a_lora_method_imports_it(cifar_dir, original_weights, tmp_path):
    weights = original_weights("resnet50")
    common_flags = f"--arch resnet50 --preset smoke --data {cifar_dir} --device cpu --weights {weights}"
    imported = heavy_imports(f"finetune.py {common_flags} --out {tmp_path / 'finetune.pth'}",
                             f"pruneft.py {common_flags} --out {tmp_path / 'pruneft.pth'}",
                             f"lora.py {common_flags} --out {tmp_path / 'lora.pth'}", cwd=tmp_path)
    assert set(imported["finetune.py"]) <= THROUGH_TIMM and set(imported["pruneft.py"]) <= THROUGH_TIMM
    assert {"peft", "transformers"} <= set(imported["lora.py"]) and "sklearn" not in imported["lora.py"]
    assert "tensorboard" not in imported["lora.py"]
