// Read a DICOM file with dcmjs as viewers do (DicomMessage.readFile, naturalizeDataset and, for
// images and SEG, Normalizer.normalizeToDataset); print what it found as JSON.
// Usage: node dcmjs-read.mjs FILE
import dcmjs from "dcmjs";
import { readNaturalized } from "./source-metadata.mjs";

const { Normalizer } = dcmjs.normalizers;

const [path] = process.argv.slice(2);
const { dataset } = readNaturalized(path);
// dcmjs normalizes images and SEG (not SR) into its multi-frame form.
const normalized = dataset.Modality === "SR" ? null : Normalizer.normalizeToDataset([dataset]);
if (dataset.Modality !== "SR" && !normalized) throw new Error("dcmjs could not normalize it");

const codeOf = (item) => {
  const code = item?.ConceptNameCodeSequence;
  const first = Array.isArray(code) ? code[0] : code;
  return first ? `${first.CodingSchemeDesignator}:${first.CodeValue}` : null;
};
const tree = (items) =>
  (Array.isArray(items) ? items : items ? [items] : []).map((item) => ({
    type: item.ValueType,
    relationship: item.RelationshipType ?? null,
    concept: codeOf(item),
    children: tree(item.ContentSequence),
  }));

const segments = (Array.isArray(dataset.SegmentSequence) ? dataset.SegmentSequence : []).map(
  (s) => ({ number: Number(s.SegmentNumber), label: s.SegmentLabel }),
);
console.log(JSON.stringify({
  sopClassUID: dataset.SOPClassUID,
  sopInstanceUID: dataset.SOPInstanceUID,
  normalizedSopClassUID: normalized?.SOPClassUID ?? null,
  numberOfFrames: dataset.NumberOfFrames === undefined ? null : Number(dataset.NumberOfFrames),
  segments,
  content: tree(dataset.ContentSequence),
}));
