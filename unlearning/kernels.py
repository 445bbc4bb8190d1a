"""What a compiled training step launches: the code inductor generates for the step's graphs (forward and backward),
read for its kernel calls, the generated (fused) kernels apart from the calls it leaves to libraries (convolutions,
matmuls: extern kernels and aten fallbacks). View ops, allocations and checks launch nothing.

The code is what inductor generates for the device it compiles on: on a CPU, C++ kernels. A GPU's Triton kernels
come from the same fused graph, but CPU code generation also fuses independent loops into one kernel (horizontal
fusion), which Triton does not by default, so a CPU's count of generated kernels is a lower bound of a GPU's.

    with capture_graphs() as sources:
        ...compile and run the step...
    launches = [graph_launches(source) for source in sources]
"""
import ast
import contextlib
from collections import Counter

import torch

from .compiling import compiling
from .training import autocast, training_mode

# Calls in a graph's wrapper code that launch nothing: views of a buffer, allocations, size and alignment checks.
NOT_LAUNCHES = ("reinterpret_tensor", "empty_strided", "alloc_from_pool", "assert_", "args.clear",
                "torch.ops.aten.view.", "torch.ops.aten.as_strided.", "torch.ops.aten._reshape_alias.",
                "torch.ops.aten.alias.")
LIBRARY_PREFIXES = ("extern_kernels.", "torch.ops.", "aten.")


def _wrapper_function(tree):
    """The function of inductor's wrapper code that runs the graph: `call` (a method or a module-level function)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "call":
            return node
    raise ValueError("no call() in inductor's generated code")


def graph_launches(source):
    """{"generated": kernels inductor generated and the graph calls, "library": calls left to libraries,
    "library_ops": Counter of those calls by name} of one compiled graph's wrapper code, each call counted as often
    as the code makes it."""
    tree = ast.parse(source)
    generated_names = {target.id for node in tree.body if isinstance(node, ast.Assign)
                       and isinstance(node.value, ast.Call) and ast.unparse(node.value.func).startswith("async_compile")
                       for target in node.targets if isinstance(target, ast.Name)}
    generated, library = 0, Counter()
    for node in ast.walk(_wrapper_function(tree)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name in generated_names:
            generated += 1
        elif name.startswith(NOT_LAUNCHES):
            continue
        elif name.startswith(LIBRARY_PREFIXES) or name.endswith(".copy_"):
            library[name.removesuffix(".default")] += 1
    return {"generated": generated, "library": sum(library.values()), "library_ops": library}


@contextlib.contextmanager
def capture_graphs():
    """Inside the block, the wrapper code of every graph inductor compiles (or loads from its cache) is appended to
    the yielded list."""
    from torch._inductor.graph import GraphLowering

    sources = []
    saved = GraphLowering.save_output_code
    GraphLowering.save_output_code = sources.append
    try:
        yield sources
    finally:
        GraphLowering.save_output_code = saved


def count_compiled_step(model, loss_fn, inputs, labels, freeze_batchnorm=False):
    """The kernels of model's training step under --compile, on inputs and labels: model compiled as train() compiles
    it (compiling.compiling), one forward (loss_fn(model, inputs, labels)) and backward. {"graphs", "generated",
    "library", "library_ops"}, summed over the compiled graphs (the forward and backward of each). The model's
    buffers, gradients and modes are left as they were."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    modes = {module: module.training for module in model.modules()}
    rng = torch.get_rng_state()
    with capture_graphs() as sources, compiling(True, inputs.device) as compiled:
        stepped = compiled.model(model)
        training_mode(model, freeze_batchnorm)
        with autocast(inputs.device):
            loss = loss_fn(stepped, inputs, labels)
        loss.backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    torch.set_rng_state(rng)
    for module, training in modes.items():
        module.train(training)
    graphs = [graph_launches(source) for source in sources]
    return {"graphs": len(graphs), "generated": sum(g["generated"] for g in graphs),
            "library": sum(g["library"] for g in graphs),
            "library_ops": dict(sum((g["library_ops"] for g in graphs), Counter()))}
