"""GPU actor pools of a chain of Ray Data stages fit the cluster's GPUs (logical GPUs on a CPU node)."""

import subprocess
import sys
import textwrap

import pytest

from reward_models.sampling import stage_groups


def test_stages_are_grouped_so_each_group_fits_the_gpus():
    assert stage_groups([1, 1, 1, 1], 4) == [[0, 1, 2, 3]]
    assert stage_groups([1, 1, 1, 1], 2) == [[0, 1], [2, 3]]
    assert stage_groups([2, 2, 2], 3) == [[0], [1], [2]]
    assert stage_groups([0.5] * 5, 1) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="stage 0 needs 2 GPUs .* the cluster has 1"):
        stage_groups([2, 2], 1)


# each stage adds its column and notes the logical GPU Ray gave its actor
PIPELINE = textwrap.dedent("""
    import ray, ray.data
    from reward_models.sampling import run_stages

    class Stage:
        def __init__(self, k):
            self.k = k
        def __call__(self, batch):
            batch[f"s{self.k}"] = batch["id"] * 10 + self.k
            batch[f"gpu{self.k}"] = [ray.get_gpu_ids()[0]] * len(batch["id"])
            return batch

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False)
    # a pipeline that cannot start fails after this long instead of waiting forever
    ray.data.DataContext.get_current().wait_for_min_actors_s = 120
    ds = run_stages(ray.data.range(8), [(Stage, (k,), {}) for k in range(4)], actors=1,
                    resources={"num_gpus": 1}, batch_size=4, num_cpus=0.25)
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [r["s3"] for r in rows] == [i * 10 + 3 for i in range(8)], rows
    assert all(r[f"gpu{k}"] in (0, 1) for r in rows for k in range(4))
    print("STAGES OK")
""")


@pytest.mark.slow
def test_four_gpu_stages_run_on_two_gpus(tmp_path):
    """Four stages of one GPU actor each on a node of two (logical) GPUs: streamed side by side the
    last two pools would wait forever for GPUs the first two hold; grouped, every row comes out."""
    run = subprocess.run([sys.executable, "-c", PIPELINE], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert "STAGES OK" in run.stdout, run.stdout[-3000:] + run.stderr[-5000:]
