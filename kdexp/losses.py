"""Distillation losses as pure functions of tensors, like torch.nn.functional: no state,
no config. Shapes: logits are (B, C); every loss returns a scalar averaged over the batch.
Each docstring states the convention chosen where papers and peer code disagree."""
import torch
import torch.nn.functional as F


def soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities of logits softened by temperature T: log_softmax(logits / T).
    The single place where temperature softening happens."""
    return F.log_softmax(logits / temperature, dim=-1)


def kl_div_log(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probabilities, summed over classes and averaged over the batch
    ('batchmean'). Written out instead of F.kl_div, which has no vmap batching rule."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: T^2 * KL(softmax(t/T) || softmax(s/T)), batchmean.

    The T^2 factor keeps the gradient scale of the soft term independent of T; KL is
    summed over classes and averaged over the batch (not averaged over classes, which
    would make it C times smaller). Adding the weighted CE on labels is the method's job.
    """
    return temperature ** 2 * kl_div_log(soften(teacher_logits, temperature), soften(student_logits, temperature))
