"""``lowrank resize``: pick a smaller size of a model saved with ``--elastic``, without recomputing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import LowrankError
from .common import Overwrite, TrustRemoteCode, input_model
from .main import app


@app.command()
def resize(
    model_dir: Annotated[Path, typer.Argument(help="A model saved by `lowrank compress --elastic`.", show_default=False)],
    ratio: Annotated[float, typer.Option(help="Fraction of the targeted weights to remove in the resized model, in (0, 1).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.", show_default=False)],
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Truncate an elastic model's factors to the ranks of --ratio (its saved allocation order) and save."""
    import lowrank
    from lowrank.io import check_output
    from lowrank.models import load_tokenizer

    if not 0.0 < ratio < 1.0:
        raise LowrankError(f"--ratio must be in (0, 1), got {ratio}; e.g. 0.5 keeps half of the targeted weights")
    source, model_dir = model_dir, input_model(model_dir, trust_remote_code)
    check_output(out, [source, model_dir], overwrite)
    model, report = lowrank.load(model_dir, ratio=ratio, trust_remote_code=trust_remote_code, return_report=True)
    lowrank.save(model, out, report=report, tokenizer=load_tokenizer(model_dir, trust_remote_code=trust_remote_code), overwrite=overwrite)
    counts = report.parameters
    print(f"resized to ratio {ratio}: targeted parameters {counts['targeted_after']:,} of {counts['targeted_before']:,}; saved to {out}")
