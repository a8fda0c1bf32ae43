"""One training step of a continuous-consistency method (TBCM, sCM): what it may and may not change."""
import torch


def assert_step_trains_student_and_logvar_only(method, batch: dict, states: int) -> None:
    """A finite [states] loss; one SGD step moves most student tensors and the log-variance head; the
    teacher is untouched."""
    teacher0 = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    student0 = {k: v.clone() for k, v in method.student.state_dict().items()}
    out = method.loss(batch, 1, ["student", "logvar"], torch.Generator().manual_seed(0))
    assert out.loss.shape == (states,) and torch.isfinite(out.loss).all()
    assert out.logs["tangent_norm"] > 0
    out.loss.mean().backward()
    params = list(method.student.parameters()) + list(method.logvar.parameters())
    torch.optim.SGD(params, lr=1e-2).step()
    assert method.logvar.linear.weight.abs().sum() > 0
    after = method.student.state_dict()
    assert sum(not torch.equal(student0[k], after[k]) for k in student0) > len(student0) // 2
    assert all(torch.equal(teacher0[k], v) for k, v in method.teacher.state_dict().items())
