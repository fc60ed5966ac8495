// Read a TID 1500 SR the way Cornerstone3D does (adapters' MeasurementReport.generateToolState)
// with its source images' metadata; print the tool state it builds and any group it could not
// read, as JSON.
// Usage: node cornerstone-sr.mjs SR SOURCE...
import { adaptersSR } from "@cornerstonejs/adapters";
import { metaData, utilities } from "@cornerstonejs/core";
import { readNaturalized, sourceImages } from "./source-metadata.mjs";

const [srPath, ...sourcePaths] = process.argv.slice(2);
const { imageIds, provider, instances } = sourceImages(sourcePaths);
metaData.addProvider((type, imageId) => provider.get(type, imageId), 10000);
// Keyed "<SOPInstanceUID>:<frame number>", as OHIF builds it (single-frame images: frame 1).
const bySopInstance = Object.fromEntries(
  instances.map((ds, index) => [`${ds.SOPInstanceUID}:1`, imageIds[index]]),
);

// generateToolState logs, and skips, each measurement group it fails to read.
const failures = [];
const logger = utilities.logger.adaptersLog.getLogger("Cornerstone3D.MeasurementReport");
const warn = logger.warn.bind(logger);
logger.warn = (message, ...rest) => {
  failures.push(`${message} ${rest.filter((r) => r instanceof Error).map((e) => process.env.VIEWER_DEBUG ? e.stack : String(e)).join(" ")}`);
  warn(message, ...rest);
};

const { dataset } = readNaturalized(srPath);
const state = adaptersSR.Cornerstone3D.MeasurementReport.generateToolState(
  dataset,
  bySopInstance,
  metaData,
);
const tools = Object.fromEntries(
  Object.entries(state).map(([tool, measurements]) => [
    tool,
    measurements.map((m) => ({
      trackingUniqueIdentifier: m.TrackingUniqueIdentifier ?? null,
      referencedImageId: m.annotation?.metadata?.referencedImageId ?? null,
      points: m.annotation?.data?.handles?.points?.length ?? 0,
    })),
  ]),
);
console.log(JSON.stringify({ tools, failures }));
