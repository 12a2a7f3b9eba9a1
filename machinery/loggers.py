"""The run's loggers: the CSV record always, TensorBoard and wandb when asked for.

Guarantees: RUN_DIR/logs/csv/metrics.csv is the run's record, append-only between crash-safe
rewrites (a new column rewrites the file under a temporary name, then renames it), so a kill at any
instant leaves it whole; a resumed run continues the same files (and the same wandb run), dropping
what was logged after its checkpoint; rows cut short by a kill are skipped when read."""

import csv
import io
import re
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.loggers import Logger, TensorBoardLogger
from lightning.fabric.utilities.rank_zero import rank_zero_only

from machinery.rundir import atomic_write_text


class RunLogger(Logger):
    """Given to Fabric(loggers=...) before launch, opened once RUN_DIR exists (after every check has
    passed); it passes every call to the loggers that --logger_name asks for."""

    def __init__(self, cfg: Any) -> None:
        self.cfg, self.loggers = cfg, []

    @property
    def name(self) -> str:
        return "run"

    @property
    def version(self) -> str:
        return ""

    def open(self, run_dir: Path, resumed_at: tuple[int, bool] | None) -> None:
        """`resumed_at`: (step, whether that step's validation came before the checkpoint)."""
        logs, step = run_dir / "logs", resumed_at and resumed_at[0]
        self.loggers = [CSVLog(logs / "csv", resumed_at)]
        if "tensorboard" in self.cfg.logger_name:  # drops the events after the checkpoint's step
            purge = {} if step is None else {"purge_step": step + 1}
            self.loggers.append(
                TensorBoardLogger(
                    logs, name="tensorboard", version="", default_hp_metric=False, **purge
                )
            )
        if "wandb" in self.cfg.logger_name:
            from lightning.pytorch.loggers import WandbLogger

            (logs / "wandb").mkdir(parents=True, exist_ok=True)
            wandb_id = re.sub(
                r"[^a-zA-Z0-9_-]", "-", run_dir.name
            )  # a resume continues the wandb run
            self.loggers.append(
                WandbLogger(
                    project=self.cfg.project,
                    name=run_dir.name,
                    id=wandb_id,
                    save_dir=str(logs),
                    resume="allow",
                    notes=self.cfg.comment or None,
                )
            )

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)

    def log_hyperparams(self, params: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        for logger in self.loggers:
            logger.log_hyperparams(params)

    def finalize(self, status: str) -> None:
        for logger in self.loggers:
            logger.finalize(status)


class CSVLog(Logger):
    """metrics.csv (one row per log call: step and the metrics logged then) and hparams.yaml."""

    def __init__(self, folder: Path, resumed_at: tuple[int, bool] | None) -> None:
        self.folder, self.path = folder, folder / "metrics.csv"
        self.columns, self.rows = ["step"], []
        if rank_zero_only.rank == 0 and resumed_at is not None and self.path.is_file():
            self.columns, rows = read_rows(self.path)
            self.rewrite([row for row in rows if before_checkpoint(row, *resumed_at)])

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {"step": step, **metrics}
        if set(row) - set(self.columns):  # a new column: the whole file again, under a new name
            self.columns += [k for k in row if k not in self.columns]
            self.rewrite([*read_rows(self.path)[1], row] if self.path.is_file() else [row])
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def rewrite(self, rows: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buffer.getvalue())

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / "hparams.yaml", yaml.safe_dump(params, sort_keys=False))


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    """(columns, complete rows) of a metrics.csv: a row a kill cut short, or without a step, is left
    out; so is anything that is not text."""
    with open(path, newline="", errors="replace") as f:
        reader = csv.DictReader(f)
        rows = [
            r
            for r in reader
            if None not in r and None not in r.values() and (r.get("step") or "").isdigit()
        ]
        return list(reader.fieldnames or ["step"]), rows


def before_checkpoint(row: dict, step: int, validated: bool) -> bool:
    """A row logged before the checkpoint: at an earlier step, or at its step unless it is a
    validation that the checkpoint came before."""
    validation = any(value for key, value in row.items() if key.startswith("val/"))
    return int(row["step"]) < step or (int(row["step"]) == step and (validated or not validation))


def hparams(run_dir: Path) -> dict:
    """What the run logged in hparams.yaml ({} when missing or not a mapping)."""
    path = run_dir / "logs" / "csv" / "hparams.yaml"
    try:
        values = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return values if isinstance(values, dict) else {}
