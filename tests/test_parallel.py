"""Hybrid parallelism and gradient compression (train.parallelism, train.gradient_compression): the same
optimisation as plain data parallelism, on real gloo process groups and real Ray Train runs."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import load_params
from pipeline.drivers.train import train_model
from pipeline.runs.identity import RunSpec
from pipeline.storage.location import Location
from pipeline.training.communication import compress_gradients, ddp_options, step_traffic
from pipeline.training.hybrid import Sharding
from tests.conftest import (
    EPOCH_METRICS, assert_same_weights, checkpoints, computed, free_port, mlflow_runs, read_history, steps,
    train_worker_processes, training_overrides, wait_for, write_params, write_params_dict,
)

STEPS = 3
LOCAL_BATCH = 4
KILL_EPOCHS = 3


def spec_of(model: str, world: int, **recipe) -> RunSpec:
    """A run of `model` on `world` workers with the default recipe, plain data parallelism unless `recipe`
    says otherwise (params.yaml's own default is hybrid)."""
    defaults = {"batch_size": world * LOCAL_BATCH, "dropout": 0.0, "powersgd_warmup_steps": STEPS - 1,
                "parallelism": "data", "gradient_compression": "none"}
    return RunSpec(model=model, num_classes=10, recipe=load_params().train.recipe().model_copy(update=defaults | recipe),
                   seed=0, epochs=1, num_workers=world, use_gpu=False, data_sha256={})


def _steps(rank: int, spec: RunSpec, resolution: int, float64: bool, port: int, out: str, cuda: bool,
           steps: int, resume_after: int | None, keep_powersgd: bool) -> None:
    """`steps` SGD steps of spec's model on this rank's share of fixed random batches, as the training loop
    sets it up: hybrid or not, DDP, its gradient compression. resume_after: after that many steps, start
    again from the weights, momentum and (keep_powersgd) PowerSGD state, as a resumed run does. Rank 0
    saves the full weights, the momentum and the bytes it wrote (to its gloo sockets, all it writes
    then) during the last step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if float64:  # rounding then stays far below what a wrong gradient would change
        torch.set_default_dtype(torch.float64)
    world = spec.num_workers
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    network, sharding, model, powersgd, optimizer = _set_up(spec, device)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == resume_after:
            saved = (network.state_dict(), optimizer.state_dict(), powersgd.state_dict() if keep_powersgd else None)
            network, sharding, model, powersgd, optimizer = _set_up(spec, device)
            network.load_state_dict(saved[0])
            optimizer.load_state_dict(saved[1])
            if saved[2]:
                powersgd.load_state_dict(saved[2], device)
        images = torch.randn(world * LOCAL_BATCH, 3, resolution, resolution, generator=generator).to(device)
        labels = torch.randint(0, 10, (world * LOCAL_BATCH,), generator=generator).to(device)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        written = _bytes_written()
        loss = nn.functional.cross_entropy(model(images[mine]), labels[mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        written = _bytes_written() - written
    weights = sharding.full_model_state(network) if sharding else network.state_dict()
    momentum = (sharding.full_optimizer_state(optimizer) if sharding else optimizer.state_dict())["state"]
    if rank == 0:
        weights = {key: value.cpu() for key, value in weights.items()}
        torch.save({"weights": weights, "momentum": [momentum[i]["momentum_buffer"].cpu() for i in sorted(momentum)],
                    "bytes": written}, out)
    dist.destroy_process_group()


def _set_up(spec: RunSpec, device: torch.device):
    torch.manual_seed(0)
    network = spec.build_model().to(device)
    sharding = Sharding.install(network, spec.num_workers) if spec.hybrid else None
    model = DistributedDataParallel(network, **ddp_options(network, spec.recipe))
    powersgd = compress_gradients(model, spec.recipe, spec.seed)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return network, sharding, model, powersgd, optimizer


def _bytes_written() -> int:
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("wchar"))


def train_steps(spec: RunSpec, folder, resolution: int = 67, float64: bool = False, cuda: bool = False,
                steps: int = STEPS, resume_after: int | None = None, keep_powersgd: bool = True) -> dict:
    out = folder / f"{spec.name}-{float64}-{cuda}-{steps}-{resume_after}-{keep_powersgd}.pt"
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=_steps, args=(rank, spec, resolution, float64, port, str(out), cuda, steps,
                                                      resume_after, keep_powersgd))
                 for rank in range(spec.num_workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        assert process.exitcode == 0
    return torch.load(out, weights_only=True)


def assert_same_tensors(found: list[torch.Tensor], expected: list[torch.Tensor], tolerance: float) -> None:
    assert len(found) == len(expected)
    for index, (got, want) in enumerate(zip(found, expected, strict=True)):
        assert got.shape == want.shape, index
        # Relative to the tensor's largest entry, with a floor: batch norm leaves the biases of the
        # convolutions before it at rounding noise (~1e-17), where relative differences mean nothing.
        scale = max(want.abs().max().item(), 1e-3)
        assert (got - want).abs().max().item() <= tolerance * scale, f"tensor {index} differs"


@pytest.fixture(scope="module")
def alexnet2012_steps(tmp_path_factory):
    """train_steps of alexnet2012 on 2 workers by setting, each trained once for the module's tests."""
    folder, done = tmp_path_factory.mktemp("steps"), {}

    def steps_with(**setting) -> dict:
        key = tuple(sorted(setting.items()))
        if key not in done:
            done[key] = train_steps(spec_of("alexnet2012", 2, **setting), folder)
        return done[key]

    return steps_with


def assert_same_steps(hybrid: dict, plain: dict, model: str, world: int, tolerance: float) -> None:
    assert list(hybrid["weights"]) == list(plain["weights"]), "the checkpoint's layout is the full model's"
    assert_same_tensors(list(hybrid["weights"].values()), list(plain["weights"].values()), tolerance)
    assert_same_tensors(hybrid["momentum"], plain["momentum"], tolerance)
    # A wrong gradient would not be caught if the weights did not move.
    initial = spec_of(model, world).build_model().state_dict()
    fc8 = [key for key in initial if key.startswith("classifier.") and key.endswith(".weight")][-1]
    assert (plain["weights"][fc8].float() - initial[fc8]).abs().max() > 1e-4


def test_hybrid_steps_equal_data_parallel_steps(alexnet2012_steps):
    assert_same_steps(alexnet2012_steps(parallelism="hybrid"), alexnet2012_steps(), "alexnet2012", 2, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "world", "resolution"), [("alexnet", 3, 63), ("vgg11_bn", 2, 32)])
def test_hybrid_steps_equal_data_parallel_steps_on_other_models(tmp_path, model, world, resolution):
    """In float64: batch norm on 4 images amplifies float32's rounding to 1e-4, float64's stays at 1e-12.
    alexnet on 3 workers: uneven slices (10 classes), and dropout before fc6 (torchvision's order)."""
    plain = train_steps(spec_of(model, world), tmp_path, resolution, float64=True)
    hybrid = train_steps(spec_of(model, world, parallelism="hybrid"), tmp_path, resolution, float64=True)
    assert_same_steps(hybrid, plain, model, world, 1e-9)


@pytest.mark.parametrize("setting", [{}, {"parallelism": "hybrid"}, {"gradient_compression": "bf16"},
                                     {"gradient_compression": "powersgd", "powersgd_rank": 2}],
                         ids=["data", "hybrid", "bf16", "powersgd"])
def test_bytes_sent_per_step_match_the_arithmetic(alexnet2012_steps, setting):
    """What rank 0 writes to its sockets in a step (after PowerSGD's warm-up) against step_traffic."""
    counted = alexnet2012_steps(**setting)["bytes"]
    expected = step_traffic(spec_of("alexnet2012", 2, **setting)).total
    # gloo adds a header of a few dozen bytes per message.
    assert counted == pytest.approx(expected, rel=0.01, abs=20_000)


@pytest.mark.parametrize("setting", [{"gradient_compression": "bf16"},
                                     {"gradient_compression": "powersgd", "powersgd_rank": 2}], ids=["bf16", "powersgd"])
def test_compression_changes_the_steps_a_little(alexnet2012_steps, setting):
    """bf16 and PowerSGD move the weights where float32 does, not exactly: they are other runs."""
    plain, compressed = alexnet2012_steps()["weights"], alexnet2012_steps(**setting)["weights"]
    assert not torch.equal(compressed["features.0.weight"], plain["features.0.weight"])
    assert_same_tensors(list(compressed.values()), list(plain.values()), 0.05)


@pytest.mark.slow
def test_a_resumed_powersgd_run_goes_on_as_if_uninterrupted(tmp_path):
    """A resumed run restores each rank's PowerSGD state (pipeline/training/worker.py checkpoints it): its
    steps are those of the run uninterrupted, to float32 rounding; started again from zero, they are not.

    Not bit for bit: the resumed DDP's first step lays its bucket out in parameter order, the
    uninterrupted one in gradient-ready order, so every gradient and factor sits at another offset of the
    flat buffers, which moves the last bits of the products that compress it (measured: 2e-7 of a
    tensor's largest entry resumed, 2.4e-2 restarted from zero, alexnet2012 after 6 steps)."""
    spec = spec_of("alexnet2012", 2, gradient_compression="powersgd", powersgd_rank=2)
    straight, resumed, forgetting = (train_steps(spec, tmp_path, steps=2 * STEPS, resume_after=resume_after,
                                                 keep_powersgd=keep)
                                     for resume_after, keep in ((None, True), (STEPS + 1, True), (STEPS + 1, False)))
    assert_same_tensors(list(resumed["weights"].values()), list(straight["weights"].values()), 1e-5)
    assert_same_tensors(resumed["momentum"], straight["momentum"], 1e-5)
    with pytest.raises(AssertionError):
        assert_same_tensors(list(forgetting["weights"].values()), list(straight["weights"].values()), 1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per worker: 2 GPUs")
def test_hybrid_steps_equal_data_parallel_steps_on_nccl(tmp_path):
    """The same on GPUs: NCCL's collectives, CUDA kernels (float64, so TF32 and rounding stay out)."""
    plain = train_steps(spec_of("alexnet2012", 2), tmp_path, float64=True, cuda=True)
    hybrid = train_steps(spec_of("alexnet2012", 2, parallelism="hybrid"), tmp_path, float64=True, cuda=True)
    assert_same_steps(hybrid, plain, "alexnet2012", 2, 1e-9)
    bf16 = train_steps(spec_of("alexnet2012", 2, gradient_compression="bf16"), tmp_path, cuda=True)
    assert_same_tensors(list(bf16["weights"].values()), list(plain["weights"].values()), 0.05)


def test_what_names_a_run():
    plain = spec_of("alexnet2012", 2)
    assert spec_of("alexnet2012", 2, parallelism="hybrid").name != plain.name
    assert spec_of("alexnet2012", 2, gradient_compression="bf16").name != plain.name
    powersgd = spec_of("alexnet2012", 2, gradient_compression="powersgd")
    assert spec_of("alexnet2012", 2, gradient_compression="powersgd", powersgd_rank=8).name != powersgd.name
    # Settings that change nothing leave the name: PowerSGD's rank without PowerSGD, anything on one worker.
    assert spec_of("alexnet2012", 2, powersgd_rank=8).name == plain.name
    alone = spec_of("alexnet2012", 1)
    assert spec_of("alexnet2012", 1, parallelism="hybrid", gradient_compression="bf16").name == alone.name


@pytest.mark.parametrize("model", ["lenet5", "resnet18", "googlenet"])
def test_hybrid_leaves_models_without_a_large_classifier_data_parallel(tmp_path, params_dict, model):
    """One train.parallelism for every model of train.models: hybrid for AlexNet and VGG beside these
    trains them as data does, the same run by name."""
    params_dict["train"] |= {"parallelism": "hybrid", "models": ["alexnet2012", model]}
    params_dict["ensemble"] |= {"model": model, "include": []}
    params = load_params(write_params_dict(tmp_path, params_dict))
    hybrid = spec_of(model, 2, parallelism=params.train.parallelism)
    assert not hybrid.hybrid and hybrid.name == spec_of(model, 2).name
    assert spec_of("alexnet2012", 2, parallelism=params.train.parallelism).hybrid


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two alexnet2012 runs of 3 epochs and a restart; 16 min on a loaded 2-core VM
def test_hybrid_run_killed_mid_epoch_resumes_to_the_uninterrupted_runs_end(tmp_path, ray_cluster, digits_betons):
    """Real Ray Train, FFCV and gloo: a hybrid alexnet2012 run loses a worker in its second epoch, resumes
    from the full-layout checkpoint, and ends bit for bit where the same run uninterrupted ends.

    Not compared with a data-parallel run: over 27 float32 steps the two orders of summation drift apart
    by up to 5% of a tensor's largest entry (rounding, amplified step by step: train_steps above with
    STEPS = 27 gave 4.6% in float32 and 9e-16 in float64); the step tests above hold the equivalence."""
    folders = {name: tmp_path / name for name in ("killed", "uninterrupted")}
    params = {name: write_params(folder, training_overrides(
        folder, model="alexnet2012", epochs=KILL_EPOCHS, ray={"max_failures": 2},
        parallelism="hybrid"))[1] for name, folder in folders.items()}
    killed: dict = {}
    started = time.time()

    def kill_a_worker_in_the_second_epoch() -> None:
        wait_for(lambda: len(checkpoints(folders["killed"])) >= 1, 300, "the first epoch's checkpoint")
        killed["victim"] = train_worker_processes(started_after=started)[1]
        killed["victim"].kill()

    killer = threading.Thread(target=kill_a_worker_in_the_second_epoch)
    killer.start()
    train_model(params["killed"], "alexnet2012", Location.local(digits_betons), Location.local(folders["killed"] / "out"))
    killer.join()
    assert not killed["victim"].is_running()
    client, runs = mlflow_runs(folders["killed"])
    for metric in EPOCH_METRICS:
        assert steps(client, runs[0].info.run_id, metric) == list(range(1, KILL_EPOCHS + 1)), metric
    logged = runs[0].data.metrics["bytes_sent_per_step"]
    assert logged == step_traffic(spec_of("alexnet2012", 2, parallelism="hybrid", batch_size=32)).total

    train_model(params["uninterrupted"], "alexnet2012", Location.local(digits_betons),
                Location.local(folders["uninterrupted"] / "out"))
    weights = {name: torch.load(folder / "out" / "model.pt", weights_only=True) for name, folder in folders.items()}
    assert list(weights["killed"]) == list(spec_of("alexnet2012", 2).build_model().state_dict()), "the full layout"
    assert_same_weights(weights["killed"], weights["uninterrupted"])
    histories = {name: computed(read_history(folder / "out")) for name, folder in folders.items()}
    assert histories["killed"] == histories["uninterrupted"]
