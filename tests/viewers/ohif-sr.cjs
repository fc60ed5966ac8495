// Run OHIF's DICOM SR SOP class handler (@ohif/extension-cornerstone-dicom-sr, its published
// bundle, unchanged) on an SR and its source images, in Node: create the SR's display set, load()
// it with the source series as the active image display set, and print as JSON what OHIF made of
// every measurement.
//
// OHIF runs in a browser inside its app; here only the parts of the app that the handler calls
// are stand-ins, each as small as the handler needs:
//  - @ohif/core: utils.sortStudyInstances (by InstanceNumber, as OHIF), guid, sopClassDictionary,
//    sortDisplaySetsCopy (a copy), classes.MetadataProvider.getUIDsFromImageID (our imageIds);
//  - @ohif/extension-cornerstone: Enums (OHIF's Cornerstone3DTools source name and version);
//  - @ohif/i18n (t returns its key), @ohif/ui-next and SystemProvider (UI only, never called);
//  - the services (display set, measurement, customization, notification) and the data source:
//    they hold the source display set and its imageIds, and record what the handler does.
// The SR and source instances are the files' own attributes (dcmjs naturalized, as OHIF's local
// file data source has them); @cornerstonejs/adapters, core and tools are OHIF's own dependencies.
// Usage: node ohif-sr.cjs SR SOURCE...
"use strict";
const Module = require("node:module");
const path = require("node:path");

const warnings = [];
const notifications = [];
const annotations = [];
const originalWarn = console.warn;
console.warn = (...args) => {
  warnings.push(args.map((a) => (typeof a === "string" ? a : a instanceof Error ? String(a) : "")).join(" ").trim());
};
console.log = () => {}; // OHIF logs freely; stdout carries only our JSON.
console.info = () => {};
console.debug = () => {};

const sopClassDictionary = {
  BasicTextSR: "1.2.840.10008.5.1.4.1.1.88.11",
  EnhancedSR: "1.2.840.10008.5.1.4.1.1.88.22",
  ComprehensiveSR: "1.2.840.10008.5.1.4.1.1.88.33",
  Comprehensive3DSR: "1.2.840.10008.5.1.4.1.1.88.34",
  CTImageStorage: "1.2.840.10008.5.1.4.1.1.2",
};
let guidCounter = 0;
const ohifCore = {
  utils: {
    guid: () => `guid-${++guidCounter}`,
    sopClassDictionary,
    sortStudyInstances: (instances) =>
      instances.sort((a, b) => Number(a.InstanceNumber) - Number(b.InstanceNumber)),
    sortDisplaySetsCopy: (displaySets) => [...displaySets],
  },
  classes: {
    MetadataProvider: {
      // Our imageIds are "source:<SOPInstanceUID>".
      getUIDsFromImageID: (imageId) => ({ SOPInstanceUID: imageId.slice("source:".length) }),
    },
  },
  DicomMetadataStore: {},
};
const stubs = {
  "@ohif/core": ohifCore,
  "@ohif/extension-cornerstone": {
    Enums: {
      CORNERSTONE_3D_TOOLS_SOURCE_NAME: "Cornerstone3DTools",
      CORNERSTONE_3D_TOOLS_SOURCE_VERSION: "0.1",
    },
  },
  "@ohif/i18n": { t: (key) => key, default: { t: (key) => key } },
  "@ohif/ui-next": {},
  "@ohif/core/src/contextProviders/SystemProvider": { useSystem: () => ({}) },
};
const originalLoad = Module._load;
Module._load = function load(request, parent, isMain) {
  if (Object.prototype.hasOwnProperty.call(stubs, request)) return stubs[request];
  return originalLoad.call(this, request, parent, isMain);
};
// The bundle injects its CSS into the page at load time.
globalThis.document ??= {
  createElement: () => ({ setAttribute() {}, appendChild() {}, style: {} }),
  createTextNode: () => ({}),
  head: { appendChild() {}, insertBefore() {} },
  querySelector: () => null,
  getElementsByTagName: () => [],
};

async function main() {
  const [srPath, ...sourcePaths] = process.argv.slice(2);
  const { readNaturalized, sourceImages } = await import("./source-metadata.mjs");
  const extensionModule = require("@ohif/extension-cornerstone-dicom-sr");
  const extension = extensionModule.default ?? extensionModule;

  const tools = require(require.resolve("@cornerstonejs/tools", {
    paths: [path.dirname(require.resolve("@ohif/extension-cornerstone-dicom-sr"))],
  }));
  const addAnnotation = tools.annotation.state.addAnnotation;
  tools.annotation.state.addAnnotation = (annotation, ...rest) => {
    annotations.push({
      uid: annotation.annotationUID,
      frameOfReferenceUID: annotation.metadata?.FrameOfReferenceUID ?? null,
      points: annotation.data?.handles?.points?.length ?? 0,
      labels: annotation.data?.labels ?? [],
    });
    try {
      return addAnnotation(annotation, ...rest);
    } catch (error) {
      return undefined; // no rendering engine here; what was added is recorded above
    }
  };

  const { instances, provider } = sourceImages(sourcePaths);
  // OHIF's cornerstone (its own copy) places SR coordinates on images through its metadata.
  const core = require(require.resolve("@cornerstonejs/core", {
    paths: [path.dirname(require.resolve("@ohif/extension-cornerstone-dicom-sr"))],
  }));
  core.metaData.addProvider((type, imageId) => provider.get(type, imageId), 10000);
  const source = {
    displaySetInstanceUID: "source-display-set",
    StudyInstanceUID: instances[0].StudyInstanceUID,
    SeriesInstanceUID: instances[0].SeriesInstanceUID,
    FrameOfReferenceUID: instances[0].FrameOfReferenceUID,
    Modality: instances[0].Modality,
    SOPClassUID: instances[0].SOPClassUID,
    sopClassUids: [...new Set(instances.map((i) => i.SOPClassUID))],
    images: instances,
    instances,
    imageIds: instances.map((i) => `source:${i.SOPInstanceUID}`),
    isDerivedDisplaySet: false,
    unsupported: false,
  };
  const subscriptions = [];
  const services = {
    displaySetService: {
      EVENTS: { DISPLAY_SETS_ADDED: "event::displaySetService:displaySetsAdded" },
      activeDisplaySets: [source],
      subscribe: (event, callback) => {
        subscriptions.push(event);
        return { unsubscribe() {} };
      },
      getDisplaySetByUID: (uid) => (uid === source.displaySetInstanceUID ? source : undefined),
      getDisplaySetsBy: (predicate) => [source].filter(predicate),
    },
    measurementService: {
      // The Cornerstone3DTools mappings OHIF's cornerstone extension registers (annotation types).
      getSourceMappings: () =>
        ["Length", "Bidirectional", "EllipticalROI", "CircleROI", "ArrowAnnotate", "Angle",
          "CobbAngle", "RectangleROI", "PlanarFreehandROI", "Probe"].map((annotationType) => ({
          annotationType,
        })),
    },
    customizationService: { getCustomization: () => undefined },
    uiNotificationService: { show: (notification) => notifications.push(notification) },
  };
  const dataSource = {
    getImageIdsForDisplaySet: (displaySet) => displaySet.imageIds ?? [],
    retrieve: { bulkDataURI: async () => new ArrayBuffer(0) },
  };
  const extensionManager = {
    getDataSources: () => [dataSource],
    getActiveDataSource: () => [dataSource],
  };
  const servicesManager = { services };

  const { dataset: sr } = readNaturalized(srPath);
  const handlers = extension.getSopClassHandlerModule({ servicesManager, extensionManager });
  const handler = handlers.find((h) => h.sopClassUids.includes(sr.SOPClassUID));
  const result = { handler: handler?.name ?? null, displaySets: 0, loadError: null };
  if (!handler) return result;
  const displaySets = handler.getDisplaySetsFromSeries([sr]);
  result.displaySets = displaySets.length;
  const [displaySet] = displaySets;
  if (!displaySet) return result;
  result.isImagingMeasurementReport = Boolean(displaySet.isImagingMeasurementReport);
  try {
    await displaySet.load();
  } catch (error) {
    result.loadError = String(error?.stack ?? error).split("\n").slice(0, 3).join(" | ");
  }
  result.isLoaded = displaySet.isLoaded === true;
  result.isRehydratable = Boolean(displaySet.isRehydratable);
  result.referencedImages = displaySet.referencedImages ?? [];
  result.measurements = (displaySet.measurements ?? []).map((m) => ({
    trackingIdentifier: m.TrackingIdentifier ?? null,
    trackingUniqueIdentifier: m.TrackingUniqueIdentifier ?? null,
    labels: m.labels ?? [],
    coords: (m.coords ?? []).map((c) => ({
      valueType: c.ValueType,
      graphicType: c.GraphicType,
      frameOfReferenceUID: c.ReferencedFrameOfReferenceSequence ?? null,
      referencedSOPInstanceUID: c.ReferencedSOPSequence?.ReferencedSOPInstanceUID ?? null,
    })),
    loaded: m.loaded === true,
    displaySetInstanceUID: m.displaySetInstanceUID ?? null,
  }));
  result.annotations = annotations;
  result.subscriptions = subscriptions;
  return result;
}

main().then(
  (result) => {
    process.stdout.write(JSON.stringify({ ...result, warnings, notifications }) + "\n");
  },
  (error) => {
    originalWarn(error);
    process.exit(1);
  },
);
