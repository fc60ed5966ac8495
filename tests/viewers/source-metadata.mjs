// Cornerstone metadata for the source images, read from the files themselves with dcmjs: the
// modules a viewer's metadata provider would give for each image, keyed by an imageId of ours.
import { readFileSync } from "node:fs";
import dcmjs from "dcmjs";

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

export function readNaturalized(path) {
  const bytes = readFileSync(path);
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const message = DicomMessage.readFile(buffer);
  const dataset = DicomMetaDictionary.naturalizeDataset(message.dict);
  dataset._meta = DicomMetaDictionary.namifyDataset(message.meta);
  return { dataset, buffer };
}

const numbers = (value) => (Array.isArray(value) ? value : [value]).map(Number);

/** Single-frame source images: imageIds "source:<SOPInstanceUID>", in the order of `paths`, and
 * a provider of Cornerstone's metadata modules for them. */
export function sourceImages(paths) {
  const instances = paths.map((path) => {
    const { dataset } = readNaturalized(path);
    delete dataset.PixelData;
    return dataset;
  });
  const imageIds = instances.map((ds) => `source:${ds.SOPInstanceUID}`);
  const byImageId = new Map(imageIds.map((id, index) => [id, instances[index]]));
  const provider = {
    get(type, imageId) {
      const ds = byImageId.get(imageId);
      if (!ds) return undefined;
      const iop = numbers(ds.ImageOrientationPatient);
      const spacing = numbers(ds.PixelSpacing);
      switch (type) {
        case "instance":
          return ds;
        case "generalImageModule":
          return { sopInstanceUID: ds.SOPInstanceUID, instanceNumber: Number(ds.InstanceNumber) };
        case "generalSeriesModule":
          return {
            seriesInstanceUID: ds.SeriesInstanceUID,
            studyInstanceUID: ds.StudyInstanceUID,
            modality: ds.Modality,
          };
        case "sopCommonModule":
          return { sopClassUID: ds.SOPClassUID, sopInstanceUID: ds.SOPInstanceUID };
        case "imagePlaneModule":
          return {
            frameOfReferenceUID: ds.FrameOfReferenceUID,
            rows: Number(ds.Rows),
            columns: Number(ds.Columns),
            imageOrientationPatient: iop,
            rowCosines: iop.slice(0, 3),
            columnCosines: iop.slice(3, 6),
            imagePositionPatient: numbers(ds.ImagePositionPatient),
            pixelSpacing: spacing,
            rowPixelSpacing: spacing[0],
            columnPixelSpacing: spacing[1],
            sliceThickness: Number(ds.SliceThickness),
          };
        case "imagePixelModule":
          return {
            samplesPerPixel: Number(ds.SamplesPerPixel),
            photometricInterpretation: ds.PhotometricInterpretation,
            rows: Number(ds.Rows),
            columns: Number(ds.Columns),
            bitsAllocated: Number(ds.BitsAllocated),
            bitsStored: Number(ds.BitsStored),
            highBit: Number(ds.HighBit),
            pixelRepresentation: Number(ds.PixelRepresentation),
          };
        default:
          return undefined;
      }
    },
  };
  return { instances, imageIds, provider };
}
