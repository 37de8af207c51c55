"""parallel/pipeline.py in one process: the split of the blocks over pipeline stages and its errors. The multi-stage
runs are in tests/distributed/test_pipeline_parallel.py."""

import pytest

from megatron_rcm.parallel.pipeline import stage_layers


def test_balanced_split_gives_the_first_stages_the_remainder():
    assert stage_layers(30, 4) == [8, 8, 7, 7]
    assert stage_layers(3, 2) == [2, 1]
    assert stage_layers(40, 8) == [5] * 8
    assert sum(stage_layers(17, 5)) == 17


def test_explicit_split_is_checked():
    assert stage_layers(3, 2, [1, 2]) == [1, 2]
    for bad in ([3, 0], [1, 1], [1, 1, 1], [1.5, 1.5]):
        with pytest.raises(ValueError, match="pipeline_layers .* must give each of the 2 pipeline stages"):
            stage_layers(3, 2, bad)
    with pytest.raises(ValueError, match="2 blocks cannot fill 3 pipeline stages"):
        stage_layers(2, 3)
