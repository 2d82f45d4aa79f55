"""`embedq bench --scenario ...`: each load scenario runs at tiny sizes against bench-zero
workers and writes its fields to bench.json. Speed is never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from embedq.tools import bench_load

BENCH = [sys.executable, "-m", "embedq.cli", "bench", "--backend", "bench-zero", "--reps", "1"]


def run_bench(tmp_path: Path, *extra: str, timeout: float = 280) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("EMBEDQ_ALLOW_BENCH_BACKEND", None)  # the bench allows its own workers
    done = subprocess.run(
        [*BENCH, "--out", str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "CPU " in done.stdout and "GPU " in done.stdout  # the machine in every header
    return json.loads((tmp_path / "bench.json").read_text())


def check_machine(result: dict) -> None:
    cpu = result["machine"]["cpu"]
    assert cpu["model"] and cpu["cores"] >= 1
    assert set(cpu["flags"]) == {"AVX2", "AVX-512", "VNNI", "AMX"}
    assert isinstance(result["machine"]["gpu"], str)


def test_core_and_main_deployment_scenarios(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path,
        *("--scenario", "core", "--scenario", "burst", "--scenario", "slow-reader"),
        *("--scenario", "streams", "--texts", "48", "--duration", "1"),
        *("--burst-clients", "3", "--burst-texts", "16", "--slow-messages", "300"),
        *("--scenario", "busy-streams", "--busy-streams", "3", "--busy-depth", "4"),
    )
    check_machine(result)
    assert result["scenarios"] == ["core", "burst", "slow-reader", "streams", "busy-streams"]
    throughput = result["throughput_texts_per_s"]
    assert {"R", "S1", "S2", "S3"} <= set(throughput)
    assert throughput["R"]["paired_ratio_to_R"] == 1.0
    assert all(throughput[name]["paired_ratio_to_R"] > 0 for name in ("S1", "S2", "S3"))
    latency = result["latency_ms"]
    assert {"R single", "uncached single", "cached single", "cached single, near cache"} <= set(
        latency
    )
    assert "p50" in latency["uncached − R single, same text"]  # per text, R alternating
    roof = result["roofline"]
    assert roof["peak_gflops"] > 0 and roof["flops_per_token"] > 0
    assert {"gflops", "percent_of_peak"} <= set(roof["S1"]) and "formula" in roof
    load = result["load"]
    burst = load["burst"]
    for key in ("goodput_texts_per_s", "goodput_over_capacity", "refusal_ms", "recovery_s"):
        assert key in burst
    assert set(burst["percent_calls"]) == {"ok", "refused", "deadline_exceeded", "other"}
    assert burst["calls"] > 0 and burst["capacity_texts_per_s"] > 0
    # Measured just before and just after the burst (the host drifts): their mean.
    before, after = burst["capacity_before_after"]
    assert before > 0 and after > 0
    assert burst["capacity_texts_per_s"] == pytest.approx((before + after) / 2)
    # Capacity is measured on the burst's own (longer) texts; core's S1 is only reported.
    assert burst["s1_core_texts_per_s"] > 0
    slow = load["slow-reader"]
    assert slow["messages_sent"] > 0 and slow["server_rss_mb"]["before"] > 0
    assert "server_rss_growth_mb" in slow and "p99" in slow["other_encode_ms"]
    streams = load["streams"]
    assert streams["streams"] == 16 and streams["ratio_to_R"] > 0
    assert streams["paired_ratio_to_R"] > 0
    # The worker's model alone at 16 texts a pass: the streams' figure split in two.
    assert streams["ceiling_texts_per_s"] > 0
    assert len(streams["ceiling_runs"]) == len(streams["runs"])
    assert streams["share_of_ceiling"] == streams["texts_per_s"] / streams["ceiling_texts_per_s"]
    busy = load["busy-streams"]
    assert busy["streams"] == 3 and busy["streams_texts_per_s"] > 0
    assert busy["other_calls"] > 0 and busy["capacity_texts_per_s"] > 0
    assert {"p50", "p95"} == set(busy["other_encode_ms"])


def test_plumbing_and_scaling(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path,
        *("--scenario", "plumbing", "--scenario", "scaling", "--redis-cluster"),
        *("--plumbing-texts", "600", "--scaling-workers", "1,2", "--scaling-servers", "1"),
        *("--scaling-seconds", "1"),
        *("--sim-forward-ms", "2", "--reps", "2"),
    )
    check_machine(result)
    assert result["roofline"] is None and "throughput_texts_per_s" not in result
    for name in ("plumbing", "plumbing-cluster"):
        plumbing = result["load"][name]
        for phase in ("uncached_batches_256", "cached_batches_256"):
            got = plumbing[phase]
            assert got["texts_per_s"] > 0 and got["commands_per_text"] >= 0
            assert {"bytes_in_per_text", "bytes_out_per_text", "by_command"} <= set(got)
        assert plumbing["waiting_streams_64"]["texts_per_s"] > 0
        # Each phase is the median of --reps runs (of two, the slower), every run beside it.
        for phase in ("uncached_batches_256", "cached_batches_256", "waiting_streams_64"):
            runs = plumbing[phase]["runs"]
            assert len(runs) == plumbing["reps"] == 2
            assert plumbing[phase]["texts_per_s"] == min(runs)
    assert result["load"]["plumbing"]["waiting_streams_64_grpc_floor"]["texts_per_s"] > 0
    assert result["load"]["plumbing"]["cached_batches_256_grpc_floor"]["texts_per_s"] > 0
    assert result["load"]["plumbing-cluster"]["redis"] == "cluster"
    scaling = result["load"]["scaling"]
    assert [(p["workers"], p["servers"]) for p in scaling["points"]] == [(1, 1), (2, 1)]
    for point in scaling["points"]:
        assert point["texts_per_s"] > 0 and point["saturated"]
        assert 0 <= point["machine_busy_percent"] <= 100
        assert {"server-1", "worker", "redis", "bench clients"} <= set(point["cpu_percent"])
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_unknown_scenario_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [*BENCH, "--out", str(tmp_path), "--scenario", "nope"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown scenario" in done.stderr


def test_paired_ratio_cancels_a_host_that_slows_between_reps() -> None:
    # The host slowed in rep 2 (R and the scenario alike) and during rep 3's scenario: the
    # paired ratio stays 0.9, the ratio of medians (54 / 80) falls to 0.675.
    assert bench_load.paired_ratio([90, 54, 40], [100, 60, 80]) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        bench_load.paired_ratio([1, 2], [1])


def test_helpers(tmp_path: Path) -> None:
    assert bench_load.selected(None) == ["core"]
    assert bench_load.selected(["all"]) == list(bench_load.SCENARIOS)
    assert bench_load.selected(["scaling", "burst"]) == ["burst", "scaling"]
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx_vnni\n")
    info = bench_load.cpu_info(str(cpuinfo))
    assert info["model"] == "Some CPU"
    assert info["flags"] == {"AVX2": True, "AVX-512": True, "VNNI": True, "AMX": False}
    # all-MiniLM-L6-v2 at 16 tokens: 6 x (2 x (4 h^2 + 2 h ffn) + 4 x 16 x h)
    config = SimpleNamespace(hidden_size=384, intermediate_size=1536, num_hidden_layers=6)
    expected = 6 * (2 * (4 * 384**2 + 2 * 384 * 1536) + 4 * 16 * 384)
    assert bench_load.flops_per_token(config, 16) == pytest.approx(expected)
    assert bench_load.saturated({"server-1": 97.0, "worker": 20.0}).startswith("server-1")
    assert bench_load.saturated({"server-1": 10.0, "worker": 20.0}).startswith("none")
    assert bench_load.saturated({"server-1": 10.0}, machine_busy=95.0).startswith("all ")
    busy, total = bench_load.machine_jiffies()
    assert 0 <= busy <= total
    burst = bench_load._burst(SimpleNamespace(duration=5.0), "worse-burst")
    assert (burst["clients"], burst["per_call"], burst["deadline"]) == (64, 256, 20.0)
    # A burst's goodput is divided by the mean of the capacity just before and just after it.
    rated = bench_load.with_capacity({"goodput_texts_per_s": 200.0}, 300.0, 200.0)
    assert rated["capacity_texts_per_s"] == 250.0 and rated["goodput_over_capacity"] == 0.8
    assert (
        bench_load.with_capacity({"goodput_texts_per_s": 1.0}, 0.0, 0.0)["goodput_over_capacity"]
        is None
    )


def test_retry_after_hint() -> None:
    class Refusal:
        def __init__(self, metadata):
            self.metadata = metadata

        def trailing_metadata(self):
            return self.metadata

    assert bench_load.retry_after_s(Refusal((("retry-after-ms", "250"),))) == 0.25
    assert bench_load.retry_after_s(Refusal(())) == 0.1
    assert bench_load.retry_after_s(Refusal((("retry-after-ms", "soon"),))) == 0.1


def test_input_texts_are_distinct(tmp_path: Path) -> None:
    """A repeated text would be a cache hit for embedq and another encode for the reference:
    the bench keeps each input text once, in its first place, up to --texts of them."""
    from embedq.tools.bench import read_texts

    lines = tmp_path / "texts.txt"
    lines.write_text("a\nb\na\n\nc\nb\nd\n", encoding="utf-8")
    assert read_texts(lines, None, 3) == ["a", "b", "c"]
    assert read_texts(lines, None, 10) == ["a", "b", "c", "d"]
    table = tmp_path / "pairs.tsv"
    table.write_text("s1\ts2\nx\ty\nx\tz\nw\ty\n", encoding="utf-8")
    assert read_texts(table, "s1", 10) == ["x", "w"]
