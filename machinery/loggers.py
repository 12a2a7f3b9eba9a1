"""metrics.csv (a kill leaves it whole), TensorBoard, wandb; a resume continues them."""

import csv
import io
import os
import re
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.loggers import Logger, TensorBoardLogger
from lightning.fabric.utilities.rank_zero import rank_zero_only

from machinery.rundir import atomic_write_text


class RunLogger(Logger):
    """Given to Fabric at launch, opened once RUN_DIR exists."""

    name, version = "run", ""

    def __init__(self, cfg: Any) -> None:
        self.cfg, self.loggers, self.columns = cfg, [], ["step"]

    def open(self, run_dir: Path, resumed_at: tuple[int, bool] | None) -> None:
        """`resumed_at`: (step, whether validation came before it)."""
        if rank_zero_only.rank > 0:
            return
        logs, cfg, self.csv = run_dir / "logs", self.cfg, run_dir / "logs/csv/metrics.csv"
        self.csv.parent.mkdir(parents=True, exist_ok=True)
        if resumed_at and self.csv.is_file():
            self.columns, rows = read_rows(self.csv)
            step, val = resumed_at  # later rows and the end's come again
            late = [not val and any(v for k, v in r.items() if k[:4] == "val/") for r in rows]
            end = [any(v for k, v in r.items() if k[:7] == "memory/") for r in rows]
            self.rewrite([r for r, *at in zip(rows, late, end) if int(r["step"]) + sum(at) <= step])
        if "tensorboard" in cfg.logger_name:
            purge = {"purge_step": resumed_at[0] + 1} if resumed_at else {}
            self.loggers.append(TensorBoardLogger(logs, "tensorboard", "", False, **purge))
        if "wandb" in cfg.logger_name:
            from lightning.pytorch.loggers import WandbLogger

            (logs / "wandb").mkdir(exist_ok=True)
            run_id = re.sub(r"[^a-zA-Z0-9_-]", "-", run_dir.name)
            run = dict(project=cfg.project, name=run_dir.name, save_dir=str(logs), resume="allow")
            self.loggers.append(WandbLogger(id=run_id, notes=cfg.comment or None, **run))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)
        if rank_zero_only.rank > 0:
            return
        row = {"step": step, **metrics}
        if new := [k for k in row if k not in self.columns]:
            self.columns += new
            self.rewrite([*read_rows(self.csv)[1], row] if self.csv.is_file() else [row])
            return
        with open(self.csv, "a", newline="", opener=nofollow) as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def log_hyperparams(self, params: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        if rank_zero_only.rank == 0:
            text = yaml.safe_dump(params, sort_keys=False)
            atomic_write_text(self.csv.with_name("hparams.yaml"), text)
        for logger in self.loggers:
            logger.log_hyperparams(params)

    def finalize(self, status: str) -> None:
        for logger in self.loggers:
            logger.finalize(status)

    def rewrite(self, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.csv, buffer.getvalue())


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    """(columns, the rows a kill did not cut short)."""
    with open(path, newline="", errors="replace", opener=nofollow) as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if None not in (*r, *r.values()) and r.get("step", "").isdigit()]
        return list(reader.fieldnames or ["step"]), rows


def nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)
