"""Generates grafana/dashboards/imgtrain.json with grafana-foundation-sdk (Grafana's typed builders).

    python deploy/monitoring/build_dashboard.py           # rewrite the JSON
    python deploy/monitoring/build_dashboard.py --check   # exit 1 if the committed JSON is not current

Edit the panels here, never the JSON: the tests check that the committed JSON equals this script's
output and evaluate every PromQL expression in it against a real Prometheus scraping a real run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import alertgroups, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import StackingConfig, VizLegendOptions
from grafana_foundation_sdk.builders.dashboard import Dashboard, QueryVariable, Row
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
)
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

OUT = Path(__file__).resolve().parent / "grafana" / "dashboards" / "imgtrain.json"
PROM = DataSourceRef(type_val="prometheus", uid="prometheus")
ALERTMANAGER = DataSourceRef(type_val="alertmanager", uid="alertmanager")
SEL = 'run_id=~"$run_id"'  # every query is restricted to the selected runs
RSEL = 'run_id=~"$run_id", rank=~"$rank"'  # ... and per-rank panels to the selected ranks
RATE = "$__rate_interval"


def query(expr: str, legend: str = "", instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend or "__auto")
    return q.instant() if instant else q.range()


def series(
    title: str,
    unit: str,
    *targets: prometheus.Dataquery,
    span: int = 8,
    stacked: bool = False,
    description: str = "",
) -> timeseries.Panel:
    p = (
        timeseries.Panel()
        .title(title)
        .datasource(PROM)
        .unit(unit)
        .span(span)
        .height(8)
        .description(description)
        .legend(
            VizLegendOptions()
            .show_legend(True)
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
        )
    )
    for ref, t in zip("ABCDEFGH", targets, strict=False):
        p = p.with_target(t.ref_id(ref))
    if stacked:
        p = p.stacking(StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(40)
    return p


def by_run(agg: str, metric: str, what: str = "", scale: str = "") -> prometheus.Dataquery:
    """One line per selected run: ``agg by (run_id)`` of ``metric`` (times ``scale``), legend "<run> what"."""
    return query(f"{scale}{agg} by (run_id) ({metric}{{{SEL}}})", " ".join(["{{run_id}}", what]).strip())


def per_rank(metric: str, what: str = "", rate: bool = False, labels: str = "") -> prometheus.Dataquery:
    """One line per selected rank: ``metric`` (its rate with ``rate``), ``labels`` added to the selector."""
    expr = f"{metric}{{{RSEL}{labels}}}"
    return query(f"rate({expr}[{RATE}])" if rate else expr, " ".join(["rank {{rank}}", what]).strip())


def per_node(metric: str, what: str) -> prometheus.Dataquery:
    """One line per node: the rate of a host counter (every rank of a node exports the same one)."""
    return query(f"max by (node) (rate({metric}{{{SEL}}}[{RATE}]))", f"{{{{node}}}} {what}")


def per_group(title: str, unit: str, metric: str, description: str = "") -> timeseries.Panel:
    """A replica-group metric of replicated mode: one line per (run, replica group)."""
    expr = f"max by (run_id, replica_group) ({metric}{{{SEL}}})"
    return series(title, unit, query(expr, "{{run_id}} group {{replica_group}}"), description=description)


def single(title: str, unit: str, metric: str, span: int = 4) -> stat.Panel:
    """A big number per selected run: the largest value of ``metric`` among its ranks."""
    return (
        stat.Panel()
        .title(title)
        .datasource(PROM)
        .unit(unit)
        .span(span)
        .height(4)
        .graph_mode(BigValueGraphMode.AREA)
        .color_mode(BigValueColorMode.VALUE)
        .with_target(by_run("max", metric).ref_id("A"))
    )


def build() -> dict:
    run_var = (
        QueryVariable("run_id")
        .label("run")
        .datasource(PROM)
        .query({"query": "label_values(imgtrain_global_step, run_id)", "refId": "run_id"})
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    rank_var = (
        QueryVariable("rank")
        .label("rank")
        .datasource(PROM)
        .query({"query": 'label_values(imgtrain_global_step{run_id=~"$run_id"}, rank)', "refId": "rank"})
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    d = (
        Dashboard("imgtrain")
        .uid("imgtrain")
        .tags(["imgtrain", "training"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .editable()
        .description(
            "Distributed training runs of imgtrain: progress, throughput, step time, ranks, hardware, "
            "checkpoints, replica groups (replicated mode) and alerts. Generated by deploy/monitoring/build_dashboard.py."
        )
        .with_variable(run_var)
        .with_variable(rank_var)
    )

    d = (
        d.with_row(Row("Progress"))
        .with_panel(single("Global step", "none", "imgtrain_global_step"))
        .with_panel(single("Epoch", "none", "imgtrain_epoch"))
        .with_panel(single("World size", "none", "imgtrain_world_size"))
        .with_panel(single("Restarts (resumes)", "none", "imgtrain_restarts"))
        .with_panel(single("Validation top-1", "percent", "imgtrain_val_top1_percent"))
        .with_panel(single("Training", "none", "imgtrain_running"))
        .with_panel(
            series(
                "Training loss",
                "none",
                by_run("avg", "imgtrain_loss", "train"),
                by_run("avg", "imgtrain_val_loss", "val"),
            )
        )
        .with_panel(
            series(
                "Accuracy",
                "percent",
                by_run("avg", "imgtrain_val_top1_percent", "val top-1"),
                by_run("avg", "imgtrain_val_top5_percent", "val top-5"),
                by_run("avg", "imgtrain_train_top1_percent", "train top-1"),
            )
        )
        .with_panel(
            series(
                "Learning rate",
                "none",
                by_run("avg", "imgtrain_learning_rate"),
            )
        )
    )

    d = (
        d.with_row(Row("Throughput and step time"))
        .with_panel(
            series(
                "Images/s (all ranks)",
                "none",
                by_run("avg", "imgtrain_images_per_second"),
            )
        )
        .with_panel(
            series(
                "Step time breakdown (share of wall time)",
                "percentunit",
                query(
                    f"avg by (phase) (rate(imgtrain_step_phase_seconds_total{{{RSEL}}}[{RATE}]))", "{{phase}}"
                ),
                stacked=True,
                description="Seconds per second spent in each phase of the step, averaged over the "
                "selected ranks: data wait, forward+backward, exposed all-reduce, "
                "optimizer, checkpoint stall. The rest is evaluation and bookkeeping.",
            )
        )
        .with_panel(series("Step time", "s", by_run("avg", "imgtrain_step_seconds")))
    )

    d = (
        d.with_row(Row("Per-rank comparison"))
        .with_panel(
            series(
                "Own step time per rank (without waiting for peers)",
                "percentunit",
                query(
                    "sum by (rank) (rate(imgtrain_step_phase_seconds_total{"
                    f'{RSEL}, phase=~"data_wait|forward_backward|optimizer"}}[{RATE}]))',
                    "rank {{rank}}",
                ),
                description="Share of wall time each rank spends on its own work; the straggler "
                "is the highest, its peers wait for it in the all-reduce.",
            )
        )
        .with_panel(
            series(
                "Exposed all-reduce per rank",
                "percentunit",
                per_rank(
                    "imgtrain_step_phase_seconds_total", rate=True, labels=', phase="allreduce_exposed"'
                ),
            )
        )
        .with_panel(
            series(
                "Data wait per rank",
                "percentunit",
                per_rank("imgtrain_step_phase_seconds_total", rate=True, labels=', phase="data_wait"'),
            )
        )
        .with_panel(
            series(
                "Slowest / median rank",
                "none",
                by_run("max", "imgtrain_step_time_max_over_median"),
                span=12,
            )
        )
        .with_panel(
            single(
                "Straggler rank (-1: none)",
                "none",
                "imgtrain_straggler_rank",
                span=12,
            )
        )
    )

    d = (
        d.with_row(Row("Hardware"))
        .with_panel(
            series(
                "GPU utilization",
                "percent",
                per_rank("imgtrain_gpu_utilization_percent", "gpu {{gpu}}"),
            )
        )
        .with_panel(
            series(
                "GPU memory",
                "bytes",
                per_rank("imgtrain_gpu_memory_used_bytes", "used"),
                per_rank("imgtrain_gpu_memory_reserved_bytes", "reserved by torch"),
            )
        )
        .with_panel(
            series(
                "GPU temperature",
                "celsius",
                per_rank("imgtrain_gpu_temperature_celsius", "gpu {{gpu}}"),
            )
        )
        .with_panel(
            series(
                "Process CPU (cores)",
                "none",
                per_rank("imgtrain_process_cpu_seconds_total", rate=True),
            )
        )
        .with_panel(
            series(
                "Process memory (RSS)",
                "bytes",
                per_rank("imgtrain_process_resident_memory_bytes"),
            )
        )
        .with_panel(
            series(
                "Host network and disk",
                "Bps",
                per_node("imgtrain_host_network_receive_bytes_total", "net in"),
                per_node("imgtrain_host_network_transmit_bytes_total", "net out"),
                per_node("imgtrain_host_disk_read_bytes_total", "disk read"),
                per_node("imgtrain_host_disk_written_bytes_total", "disk write"),
            )
        )
    )

    d = (
        d.with_row(Row("Checkpoints"))
        .with_panel(
            series(
                "Checkpoint age",
                "s",
                by_run("max", "imgtrain_checkpoint_age_seconds", "age"),
                by_run(
                    "max",
                    "imgtrain_checkpoint_interval_seconds",
                    "alert threshold (2 x interval)",
                    scale="2 * ",
                ),
            )
        )
        .with_panel(
            series(
                "Checkpoint duration",
                "s",
                by_run("max", "imgtrain_checkpoint_stall_seconds", "training loop held"),
                by_run("max", "imgtrain_checkpoint_write_seconds", "write (rank 0)"),
            )
        )
        .with_panel(
            series(
                "Failures",
                "none",
                by_run("max", "imgtrain_checkpoint_failures", "checkpoint write failures"),
                by_run("max", "imgtrain_bad_files_total", "undecodable images"),
            )
        )
    )

    # fault_tolerance.mode=replicated (torchft): empty for restart-mode runs, which export none of these.
    d = (
        d.with_row(Row("Fault tolerance (replicated mode)"))
        .with_panel(
            series(
                "Replica groups in the quorum",
                "none",
                by_run("min", "imgtrain_quorum_size", "quorum"),
                by_run("max", "imgtrain_replica_groups_expected", "full size"),
                description="Replica groups that take part in each step, against the job's full size "
                "(fault_tolerance.replicated.num_groups). ImgtrainQuorumBelowFull fires when the quorum "
                "stays below it for 10 minutes.",
            )
        )
        .with_panel(
            series(
                "Quorum changes",
                "none",
                by_run("max", "imgtrain_quorum_id", "quorum id"),
                description="The lighthouse's quorum id: each step up is a membership change (a group "
                "left or joined).",
            )
        )
        .with_panel(
            per_group(
                "Steps dropped",
                "none",
                "imgtrain_steps_dropped_total",
                description="Steps not committed (the commit vote failed: a peer died mid-step) or whose "
                "missing groups' share was dropped (missing_group_policy: drop).",
            )
        )
        .with_panel(
            per_group(
                "Heals",
                "none",
                "imgtrain_heals_total",
                description="Times a replica group fetched the live state from a peer (after a restart "
                "or after falling behind).",
            )
        )
        .with_panel(per_group("Heal duration (last heal)", "s", "imgtrain_heal_seconds"))
        .with_panel(per_group("State transferred by heals", "bytes", "imgtrain_heal_bytes_total"))
    )

    d = (
        d.with_row(Row("Alerts"))
        .with_panel(
            table.Panel()
            .title("Firing imgtrain alerts")
            .datasource(PROM)
            .span(12)
            .height(8)
            .show_header(True)
            .with_target(
                query(f'ALERTS{{alertname=~"Imgtrain.*", alertstate="firing", {SEL}}}', instant=True)
                .format("table")
                .ref_id("A")
            )
        )
        .with_panel(
            alertgroups.Panel()
            .title("Alertmanager: imgtrain alert groups")
            .datasource(ALERTMANAGER)
            .alertmanager("alertmanager")
            .labels('alertname=~"Imgtrain.*"')
            .expand_all(True)
            .span(12)
            .height(8)
        )
    )
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(d.build()))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--check", action="store_true", help="compare with the committed JSON instead of writing it"
    )
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
