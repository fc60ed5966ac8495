// Load a DICOM SEG the way Cornerstone3D does (adapters' Segmentation.createFromDICOMSegBuffer)
// onto its source images, and write the labelmaps it builds to OUT: one uint16 per source voxel,
// in the order of the source files given, for each labelmap (Cornerstone3D spreads overlapping
// segments over several labelmaps).
// Usage: node cornerstone-seg.mjs SEG OUT SOURCE...   Prints JSON to stdout.
import { writeFileSync } from "node:fs";
import { adaptersSEG } from "@cornerstonejs/adapters";
import { metaData } from "@cornerstonejs/core";
import { readNaturalized, sourceImages } from "./source-metadata.mjs";

const [segPath, outPath, ...sourcePaths] = process.argv.slice(2);
const { imageIds, provider, instances } = sourceImages(sourcePaths);
metaData.addProvider((type, imageId) => provider.get(type, imageId), 10000);

const { buffer } = readNaturalized(segPath);
const result = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
  imageIds,
  buffer,
  { metadataProvider: metaData },
);
const rows = Number(instances[0].Rows);
const columns = Number(instances[0].Columns);
const slice = rows * columns;
const volume = new Uint16Array(result.labelMapImages.length * imageIds.length * slice);
result.labelMapImages.forEach((labelmaps, layer) => {
  labelmaps.forEach((image, index) => {
    const data = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
    volume.set(data, (layer * imageIds.length + index) * slice);
  });
});
writeFileSync(outPath, Buffer.from(volume.buffer));
const segments = {};
for (const [number, meta] of Object.entries(result.segMetadata?.data ?? {})) {
  if (meta) segments[number] = meta.SegmentLabel ?? null;
}
console.log(JSON.stringify({
  labelmaps: result.labelMapImages.length,
  shape: [result.labelMapImages.length, imageIds.length, rows, columns],
  segments,
  overlapping: Boolean(result.overlappingSegments),
}));
