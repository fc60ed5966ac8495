"""Export benchmark: a result set (SEG + SR) and a 300-instance CT study sent to Orthanc by
C-STORE and by STOW-RS, with pacs-agent's own senders, in the same run.

    python -m bench.export --runs 3

Each send goes to an empty Orthanc (the study is deleted between sends), through the same
functions the export outbox calls (agent.export.dimse.send and agent.export.stow.send), and
counts only when every instance came back stored. Medians are printed, with the ratio
STOW-RS / C-STORE (below 1: STOW-RS is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread

from agent.db.deliveries import ObjectStatus
from agent.export import dimse, stow
from agent.export.outbox import Send
from agent.settings import DestinationSettings
from bench.ct_series import write_ct_series
from tests.encode import build_and_save
from tests.support.orthanc import Orthanc


def _outbox(files: Sequence[Path], folder: Path) -> list[Path]:
    """Copies named by SOP Instance UID, as the export outbox holds them."""
    folder.mkdir(parents=True)
    named = []
    for path in files:
        target = folder / f"{dcmread(path, stop_before_pixels=True).SOPInstanceUID}.dcm"
        target.write_bytes(path.read_bytes())
        named.append(target)
    return named


def _send_once(pacs: Orthanc, send: Send, dest: DestinationSettings, files: list[Path]) -> float:
    answers: list[ObjectStatus] = []
    start = time.perf_counter()
    send(dest, "PACS_AGENT", files, answers.append)
    elapsed = time.perf_counter() - start
    stored = sum(a.stored for a in answers)
    if stored != len(files):
        raise RuntimeError(f"{dest.kind}: {stored} of {len(files)} stored")
    for study in pacs.studies():  # an empty PACS for the next send
        pacs.request("DELETE", f"/studies/{study}")
    return elapsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp, Orthanc() as pacs:
        if not pacs.dicomweb_enabled:
            print("Orthanc's DICOMweb plugin is missing (package orthanc-dicomweb)")
            return 1
        root = Path(tmp)
        results = _outbox(build_and_save(root / "built"), root / "results")
        study = _outbox(write_ct_series(root / "ct", slices=args.slices), root / "study")
        cstore = DestinationSettings(
            name="orthanc", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port
        )
        web = DestinationSettings(name="orthanc-web", kind="dicomweb", url=pacs.dicomweb_url)
        rows = []
        for label, files in (("SEG + SR", results), (f"CT study, {len(study)} instances", study)):
            mb = sum(p.stat().st_size for p in files) / 1e6
            times: dict[str, list[float]] = {"C-STORE": [], "STOW-RS": []}
            for _ in range(args.runs):  # alternate, so that neither gets the warmer machine
                times["C-STORE"].append(_send_once(pacs, dimse.send, cstore, files))
                times["STOW-RS"].append(_send_once(pacs, stow.send, web, files))
            c, s = (statistics.median(times[k]) for k in ("C-STORE", "STOW-RS"))
            rows.append((label, mb, c, s))
            print(
                f"{label}: C-STORE {times['C-STORE']}, STOW-RS {times['STOW-RS']}", file=sys.stderr
            )

    print(f"pacs-agent export to Orthanc 1.10.1, median of {args.runs} sends each")
    print(f"{'what':<28} {'MB':>7} {'C-STORE s':>10} {'STOW-RS s':>10} {'STOW/C-STORE':>13}")
    for label, mb, c, s in rows:
        print(f"{label:<28} {mb:>7.2f} {c:>10.2f} {s:>10.2f} {s / c:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
