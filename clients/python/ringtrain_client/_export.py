"""torch.nn.Module -> TorchScript bytes, as ringtrain's workers load them
(README, "Bring your own model"; examples/export_model.py). Needs torch,
imported only here."""
import contextlib
import io
import warnings


def export_module(module, example_inputs=None):
    """The TorchScript file (torch.jit.save) of `module`, as bytes.

    A torch.jit.ScriptModule is saved as it is; an nn.Module is compiled
    with torch.jit.script, or, given `example_inputs` (a tensor or a tuple
    of tensors, e.g. torch.zeros(1, 1, 28, 28) for Fashion-MNIST), traced
    with torch.jit.trace. The module's forward takes a batch of inputs and
    returns logits [N, C] (or, with loss = "model", forward(inputs, targets)
    returns the loss)."""
    from .client import RingtrainError

    try:
        import torch
    except ImportError:
        raise RingtrainError(
            "exporting a module needs torch: pip install torch (or ringtrain-client[torch])"
        ) from None
    if isinstance(module, torch.jit.ScriptModule):
        scripted = module
    elif isinstance(module, torch.nn.Module):
        try:
            with _torchscript_is_the_point():
                if example_inputs is None:
                    scripted = torch.jit.script(module)
                else:
                    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
                    scripted = torch.jit.trace(module, inputs)
        except Exception as e:  # torch raises many kinds here
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            how = "trace" if example_inputs is not None else "script"
            hint = "" if example_inputs is not None else " (pass example_inputs to trace it instead)"
            raise RingtrainError(
                f"cannot {how} {type(module).__name__} to TorchScript: {first}{hint}"
            ) from None
    else:
        raise TypeError(f"not a torch.nn.Module: {type(module).__name__}")
    buf = io.BytesIO()
    with _torchscript_is_the_point():
        torch.jit.save(scripted, buf)
    return buf.getvalue()


@contextlib.contextmanager
def _torchscript_is_the_point():
    """Recent torch marks torch.jit deprecated (in favour of torch.export);
    TorchScript is what ringtrain's workers load, so that warning is only
    noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        yield
