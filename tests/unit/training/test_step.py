"""The rCM step module at CP=1 gives the trainer's per-micro-batch passes bitwise: one student micro-batch (sCM and
DMD on) and one critic micro-batch of the tiny default, losses and parameter gradients, in one fresh process."""

import torch

from megatron_rcm.parallel import run_on_ranks


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _check_against_trainer(run_dir):
    from megatron_rcm.training.config import load_config
    from megatron_rcm.training.step import RCMStep
    from megatron_rcm.training.trainer import Trainer

    config = load_config(None, [f"run_dir={run_dir}", "parallel.grad_sync=torch", "training.micro_batch_size=2",
                                "training.global_batch_size=2", "logging.tensorboard=false",
                                "logging.eval_interval=0"])
    tr = Trainer(config)
    step = RCMStep(config.rcm, tr.schedule, tr.teacher_module, tr.student.module, tr.critic.module,
                   student_train=tr.student.net, critic_train=tr.critic.net, neg_text=tr.neg_text)
    assert step.sum_fn is None
    x0, text = tr.batches.next()[0]
    # tangent_warmup = 100, student_update_freq = 2: 100 is a student step with DMD, 101 a critic step
    for it, phase, trainable in ((100, "student", tr.student), (101, "critic", tr.critic)):
        assert tr.schedule.phase(it) == phase and tr.schedule.dmd_active(it)
        trainable.zero_grad()
        if phase == "student":
            loss, parts = tr.student_grad_pass(tr.student_no_grad(x0, text, it, tr.generator(it, 0)), text)
        else:
            loss, parts = tr.critic_grad_pass(tr.critic_no_grad(x0, text, it, tr.generator(it, 0)), text)
        loss.sum().backward()
        expected = _grads(trainable.module)
        trainable.zero_grad()

        out = step.run(phase, step.micro_batch(x0, text, tr.generator(it, 0)), it)
        out.loss.sum().backward()
        got = _grads(trainable.module)
        assert set(parts) == set(out.parts) == ({"loss/scm", "loss/dmd"} if phase == "student" else {"loss/critic"})
        assert torch.equal(out.loss, loss) and torch.equal(out.total, loss.detach()), phase
        for k in parts:
            assert torch.equal(out.parts[k], parts[k]), (phase, k)
            assert parts[k].abs().min() > 0, (phase, k)  # real losses, not an empty part
        assert set(got) == set(expected) and len(got) > 0
        for n in expected:
            assert torch.equal(got[n], expected[n]), (phase, n)
        assert any(g.abs().max() > 0 for g in got.values()), phase
    trainable.zero_grad()


def test_step_matches_the_trainer_passes_bitwise(tmp_path):
    run_on_ranks(_check_against_trainer, 1, str(tmp_path / "run"))
