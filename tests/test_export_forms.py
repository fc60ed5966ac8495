"""What the pipeline encodes: dated at the first encoding, in the SEG form destinations take."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset

from agent.db.database import utcnow
from agent.db.switches import ModelSwitches
from agent.domain import Manifest
from agent.pipeline import encode, export, results_dir
from agent.results import load_result, save_result
from agent.settings import DestinationSettings
from tests.support.dciodvfy import assert_dciodvfy_clean
from tests.support.dcmtk import StoreSCP
from tests.test_tasks import _job

SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _local(when: datetime) -> str:
    """`when` as the objects write it: a DT in this host's local time (no source offset)."""
    return when.astimezone().strftime("%Y%m%d%H%M%S")


def _dates(path: Path) -> set[str]:
    ds = pydicom.dcmread(path)
    values = {
        str(ds.ContentDate) + str(ds.ContentTime),
        str(ds.InstanceCreationDate) + str(ds.InstanceCreationTime),
    }
    values |= {
        str(item.ContributionDateTime)
        for item in ds.ContributingEquipmentSequence
        if "ContributionDateTime" in item
    }
    return values


def test_a_retry_encodes_the_same_bytes_dated_at_the_first_attempt(tmp_path: Path) -> None:
    with _job(tmp_path) as job:
        ModelSwitches(job.ctx.db).set("second", "off")
        job.infer()
        manifest = Manifest.from_json(job.ctx.layout.manifest_path(job.job_id).read_text())
        manifest = replace(manifest, inputs=manifest.inputs[:1])  # ct-tissue's, which ran
        before = utcnow()
        [files] = encode(job.ctx, manifest).values()
        after = utcnow()
        first = {path: path.read_bytes() for path in files}
        # SEG and SR, every date of each: when the result was made, not the source's time.
        [made] = {d for path in files for d in _dates(path)}
        assert _local(before) <= made <= _local(after)
        # The objects are lost (a crash before they were all sent, a new worker) and
        # encoded again, a second later at least: the same bytes, the first attempt's time.
        for path in files:
            path.unlink()
        while utcnow().replace(microsecond=0) <= after.replace(microsecond=0):
            time.sleep(0.05)
        [again] = encode(job.ctx, manifest).values()
        assert again == files
        assert {path: path.read_bytes() for path in again} == first


def _exclusive(folder: Path, tmp: Path) -> None:
    """Rewrite the result in `folder` with each voxel in its first segment only, and its
    voxel counts and volumes to match (a mean is kept: the form under test ignores it)."""
    result = load_result(folder)
    masks = result.masks.copy()
    for k in range(1, len(masks)):
        masks[k] &= ~masks[:k].any(axis=0)
    voxel_ml = next(m.volume_ml / m.voxel_count for m in result.measurements if m.voxel_count)
    measurements = []
    for m, mask in zip(result.measurements, masks, strict=True):
        count = int(np.count_nonzero(mask))
        mean = m.mean_hu if count else math.nan
        measurements.append(replace(m, voxel_count=count, volume_ml=count * voxel_ml, mean_hu=mean))
    save_result(folder, replace(result, masks=masks, measurements=tuple(measurements)), tmp)


def _export_to_viewer_and_pacs(
    tmp_path: Path, *, exclusive: bool
) -> tuple[dict[str, dict[str, Dataset]], Path]:
    """Export one job to a LABELMAP destination ("viewer", storescp) and a BINARY one
    ("pacs"); what each received by SOP Class UID, and the viewer's folder."""
    with (
        StoreSCP(tmp_path / "viewer", aet="VIEWER", extra_args=["--promiscuous"]) as viewer,
        StoreSCP(tmp_path / "pacs", aet="PACS") as pacs,
    ):
        destinations = (
            DestinationSettings(
                name="viewer",
                ae_title="VIEWER",
                host=viewer.host,
                port=viewer.port,
                seg_type="labelmap",
            ),
            DestinationSettings(name="pacs", ae_title="PACS", host=pacs.host, port=pacs.port),
        )
        with _job(tmp_path / "job", destinations) as job:
            ModelSwitches(job.ctx.db).set("second", "off")
            job.infer()
            if exclusive:
                _exclusive(results_dir(job.ctx, job.job_id) / "ct-tissue", job.ctx.layout.tmp)
            export(job.ctx, job.job_id)
            assert job.state() == "done: 2 objects sent to viewer, pacs"
        received = {
            name: {str(ds.SOPClassUID): ds for ds in map(pydicom.dcmread, scp.files())}
            for name, scp in (("viewer", viewer), ("pacs", pacs))
        }
    return received, viewer.folder


def _referenced(sr: Dataset) -> set[str]:
    return {
        ref.ReferencedSOPInstanceUID
        for item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def test_each_destination_gets_the_seg_form_it_takes(tmp_path: Path) -> None:
    received, folder = _export_to_viewer_and_pacs(tmp_path, exclusive=True)
    assert set(received["viewer"]) == {LABEL_MAP_SEGMENTATION, COMPREHENSIVE_3D_SR}
    assert set(received["pacs"]) == {SEGMENTATION, COMPREHENSIVE_3D_SR}
    for name, seg_class in (("viewer", LABEL_MAP_SEGMENTATION), ("pacs", SEGMENTATION)):
        # Each SR references the SEG sent with it.
        seg, sr = received[name][seg_class], received[name][COMPREHENSIVE_3D_SR]
        assert seg.SOPInstanceUID in _referenced(sr)
    labelmap = received["viewer"][LABEL_MAP_SEGMENTATION]
    binary = received["pacs"][SEGMENTATION]
    assert labelmap.SOPInstanceUID != binary.SOPInstanceUID
    assert labelmap.SeriesInstanceUID == binary.SeriesInstanceUID
    # Both forms of one result say it was made at the same time.
    assert (labelmap.ContentDate, labelmap.ContentTime) == (binary.ContentDate, binary.ContentTime)
    [path] = [
        p
        for p in folder.iterdir()
        if p.is_file() and pydicom.dcmread(p).SOPClassUID == LABEL_MAP_SEGMENTATION
    ]
    assert_dciodvfy_clean(path)


def test_a_result_whose_segments_overlap_goes_binary_to_a_labelmap_destination(
    tmp_path: Path,
) -> None:
    """The built-in model's body holds the other segments: no LABELMAP SEG can hold them."""
    received, _ = _export_to_viewer_and_pacs(tmp_path, exclusive=False)
    assert set(received["viewer"]) == {SEGMENTATION, COMPREHENSIVE_3D_SR}
    uids = {name: {ds.SOPInstanceUID for ds in got.values()} for name, got in received.items()}
    assert uids["viewer"] == uids["pacs"]
