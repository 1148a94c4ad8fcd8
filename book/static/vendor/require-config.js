// Point RequireJS at the vendored ipywidgets manager so that the manager's webpack public path
// (derived from its AMD module URL) resolves its fonts under _static/vendor/html-manager/ instead of
// <page dir>/@jupyter-widgets/html-manager/dist/. Loaded between require.js and embed-amd.js.
(function () {
  var here = document.currentScript.src;
  var base = here.slice(0, here.lastIndexOf("/") + 1);
  window.require.config({ paths: { "@jupyter-widgets/html-manager/dist": base + "html-manager" } });
})();
