"""RCMConfig: validation and the DMD gradient scale."""

import pytest

from megatron_rcm.diffusion import RCMConfig


def test_config_validation():
    with pytest.raises(ValueError):
        RCMConfig(scm_weight=0.0, dmd_weight=0.0)
    with pytest.raises(ValueError):
        RCMConfig(rollout_steps_sampling="random")
    assert RCMConfig(dmd_weight=0.0).uses_dmd is False


def test_dmd_gradient_scale_is_one_at_the_reference_size_and_follows_sqrt_numel():
    c = RCMConfig()
    assert c.dmd_weight_mode == "per_sample" and c.dmd_reference_numel == 16 * 21 * 60 * 104
    assert c.dmd_gradient_scale(c.dmd_reference_numel) == 1.0
    assert c.dmd_gradient_scale(c.dmd_reference_numel // 4) == pytest.approx(2.0)
    assert RCMConfig(dmd_weight_mode="paper").dmd_gradient_scale(2) == 1.0
    with pytest.raises(ValueError, match="dmd_weight_mode"):
        RCMConfig(dmd_weight_mode="per_element")
