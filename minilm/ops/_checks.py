"""Guards the ops and models share: one device for every tensor argument, no double backward, and the range
of integer ids."""
import torch


def id_range(x):
    """(min, max) of a non-empty integer tensor as Python ints: one reduction pass and one host sync (a device
    sync on a GPU), so that an id out of range becomes a clear message instead of a device-side assert."""
    lo, hi = torch.stack(torch.aminmax(x)).tolist()
    return lo, hi


def check_one_device(op, tensors, seed=None):
    """Raise unless every tensor in `tensors` ({name: tensor or list of tensors}) is on one device, and `seed`
    (when given) on the CPU. Also run by the fake functions: a meta tensor among real ones sends a call to
    them (the Meta key outranks CPU and CUDA), where it must fail rather than return uninitialised memory."""
    named = []
    for name, x in tensors.items():
        named += [(f"{name}[{i}]", t) for i, t in enumerate(x)] if isinstance(x, (list, tuple)) else [(name, x)]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: all tensors must be on one device; {first_name} is on {first.device}, "
                             f"{name} on {t.device}")
    # The seed is read on the host. Only a call traced on meta tensors may pass a meta seed.
    if seed is not None and seed.device.type != "cpu" and not (seed.is_meta and first.is_meta):
        raise ValueError(f"{op}: seed must be a CPU tensor, got one on {seed.device}")


def autocast_casts(device, dtypes):
    """Whether autocast will cast tensors of these dtypes on `device` to one dtype before the op runs
    (csrc/autocast.cpp): inside an autocast region for the device, when each is fp32, bf16 or fp16 (autocast
    leaves fp64 alone). Then the op may take them mixed, as torch's own ops do there."""
    return (device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
            and all(d in (torch.float32, torch.bfloat16, torch.float16) for d in dtypes))


def forbid_double_backward(backward_op, op):
    """Register an autograd formula for a backward op that raises: the kernels compute first derivatives
    only, and without one, autograd would treat the backward op as a constant under create_graph=True and
    return a wrong second derivative with only a warning."""
    def no_double_backward(ctx, *grads):
        raise RuntimeError(f"{op}: double backward (the gradient of its gradient, e.g. with create_graph=True) "
                           "is not supported; use the reference implementation for that")

    torch.library.register_autograd(backward_op, no_double_backward, setup_context=lambda ctx, inputs, output: None)
