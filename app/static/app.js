// clip-search web page: text search, search by image (file input or drop), "more like this", zero-shot labels.
// Plain browser JavaScript, no build step; talks only to this server's JSON API.
"use strict";

(() => {
  const KEY_STORAGE = "clipsearch.apiKey";
  const KEY_HEADER = "X-API-Key";
  const MAX_K = 1000;
  const LARGE_SIZE = 512; // px: thumbnail size for the selected image
  const READY_POLL_MS = 5000; // while not ready or empty: how often the status is checked again
  const MIN_RELEVANCE = 0.95; // "only relevant" text results: the server's relevance scale (app/relevance.py)

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"),
    indexInfo: $("index-info"),
    searchForm: $("search-form"),
    query: $("query"),
    k: $("k"),
    relevant: $("relevant"),
    upload: $("upload"),
    dropZone: $("drop-zone"),
    preview: $("upload-preview"),
    keyForm: $("key-form"),
    apiKey: $("api-key"),
    keyMessage: $("key-message"),
    selected: $("selected"),
    selectedLink: $("selected-link"),
    selectedImage: $("selected-image"),
    selectedPath: $("selected-path"),
    selectedMeta: $("selected-meta"),
    selectedOriginal: $("selected-original"),
    classifyForm: $("classify-form"),
    labels: $("labels"),
    labelsResult: $("labels-result"),
    heading: $("results-heading"),
    results: $("results"),
  };

  /** An HTTP error with the server's message (status 0: the server could not be reached). */
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  let apiKey = loadKey();
  let lastAction = null; // retried once an API key is given after a 401
  let requestSeq = 0; // only the latest grid request may render
  let previewUrl = null;
  let selectedHit = null;
  let readyTimer = null;
  let indexSummary = ""; // "12 images indexed (...)": shown beside the status once the status says other things

  // --- API key -------------------------------------------------------------------------------------------------

  function loadKey() {
    try {
      return window.localStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return ""; // storage disabled: the key lives for this page only
    }
  }

  function saveKey(value) {
    apiKey = value;
    try {
      window.localStorage.setItem(KEY_STORAGE, value);
    } catch {
      // storage disabled: keep the key in memory
    }
  }

  function askForKey() {
    el.keyMessage.textContent = apiKey ? "The server refused this key." : "This server needs an API key.";
    el.keyForm.hidden = false;
    el.apiKey.focus();
  }

  /** ``url`` with ``params`` set and, when a key is known, ``api_key`` (for <img>, which cannot send headers). */
  function withParams(url, params = {}, key = false) {
    const target = new URL(url, window.location.origin);
    for (const [name, value] of Object.entries(params)) target.searchParams.set(name, String(value));
    if (key && apiKey) target.searchParams.set("api_key", apiKey);
    return target.origin === window.location.origin ? target.pathname + target.search : target.href;
  }

  // --- requests ------------------------------------------------------------------------------------------------

  /** The message in an error body: ``{"detail": "..."}`` or FastAPI's ``{"detail": [{"loc", "msg"}, ...]}``. */
  function describeError(status, body) {
    const detail = body && body.detail;
    if (typeof detail === "string" && detail) return detail;
    if (Array.isArray(detail) && detail.length) {
      return detail
        .map((item) => {
          const loc = Array.isArray(item.loc) ? item.loc.filter((part) => part !== "body" && part !== "query") : [];
          return loc.length ? `${loc.join(".")}: ${item.msg}` : String(item.msg);
        })
        .join("; ");
    }
    return `the server answered ${status}`;
  }

  /** Fetch JSON; throws ApiError with the server's message. ``allow`` lists non-2xx statuses to return. */
  async function api(path, options = {}, allow = []) {
    const headers = new Headers(options.headers || {});
    headers.set("Accept", "application/json");
    if (apiKey) headers.set(KEY_HEADER, apiKey);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (error) {
      throw new ApiError(0, `cannot reach the server (${error.message})`);
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null; // not JSON (a proxy's error page, say)
    }
    if (response.ok || allow.includes(response.status)) return { status: response.status, body };
    if (response.status === 401) askForKey();
    throw new ApiError(response.status, describeError(response.status, body));
  }

  // --- status line ---------------------------------------------------------------------------------------------

  function setStatus(message, kind = "info") {
    el.status.textContent = message;
    el.status.dataset.kind = kind;
    el.indexInfo.textContent = indexSummary;
    el.indexInfo.title = indexSummary;
    el.indexInfo.hidden = !indexSummary || message === indexSummary;
  }

  function showError(error) {
    const message = error instanceof ApiError ? error.message : String(error);
    setStatus(`Error: ${message}`, "error");
  }

  function plural(count, word) {
    return `${count} ${word}${count === 1 ? "" : "s"}`;
  }

  /** Check again later, while the status line still shows the message that asked for it. */
  function pollStatus() {
    const shown = el.status.textContent;
    readyTimer = window.setTimeout(() => {
      if (el.status.textContent === shown) loadStatus().catch(showError);
    }, READY_POLL_MS);
  }

  async function loadStatus() {
    window.clearTimeout(readyTimer);
    const ready = await api("/readyz", {}, [503]);
    if (ready.status === 503 || !(ready.body && ready.body.ready)) {
      const reason = (ready.body && ready.body.reason) || "the server is starting";
      indexSummary = "";
      setStatus(`Not ready: ${reason}`, "error");
      pollStatus();
      return;
    }
    const { body: stats } = await api("/api/stats");
    if (!stats.images) {
      indexSummary = "";
      setStatus(
        "The index is empty: run clip-index build <image folder> --index-dir <index folder> to add images.",
        "warning",
      );
      pollStatus();
      return;
    }
    const model = stats.model ? `, model ${stats.model}` : "";
    indexSummary = `${plural(stats.images, "image")} indexed (generation ${stats.generation}${model})`;
    setStatus(indexSummary);
  }

  // --- results grid --------------------------------------------------------------------------------------------

  /** The k input as an integer 1..1000, or null after telling the user what is wrong. */
  function readK() {
    const k = Number(el.k.value);
    if (!Number.isInteger(k) || k < 1 || k > MAX_K) {
      setStatus(`Error: the number of results must be a whole number from 1 to ${MAX_K}.`, "error");
      el.k.focus();
      return null;
    }
    return k;
  }

  function renderResults(hits, heading) {
    el.heading.textContent = heading;
    el.heading.hidden = false;
    const items = hits.map((hit) => {
      const item = document.createElement("li");
      item.className = "result";
      item.dataset.id = String(hit.id);
      item.title = `${hit.path} (score ${hit.score.toFixed(3)})`;
      if (selectedHit && selectedHit.id === hit.id) item.classList.add("current");

      const button = document.createElement("button");
      button.type = "button";
      button.setAttribute("aria-label", `More like ${hit.path}`);
      button.addEventListener("click", () => selectImage(hit));

      const image = document.createElement("img");
      image.src = withParams(hit.thumbnail_url, {}, true);
      image.alt = hit.path;
      image.loading = "lazy";
      image.decoding = "async";
      image.addEventListener("error", () => item.classList.add("broken"));

      const score = document.createElement("span");
      score.className = "score";
      score.textContent = hit.score.toFixed(3);
      const path = document.createElement("span");
      path.className = "path";
      path.textContent = hit.path;

      button.append(image, path, score);
      item.append(button);
      return item;
    });
    el.results.replaceChildren(...items);
  }

  /** Run one grid request: ``load()`` returns the search response; stale answers are dropped. */
  async function runSearch(load, heading, describe, cutOff = false) {
    const seq = ++requestSeq;
    setStatus("Searching\u2026", "busy");
    try {
      const { body } = await load();
      if (seq !== requestSeq) return;
      renderResults(body.results, heading);
      if (!body.results.length) {
        const why = cutOff ? " Nothing indexed looks relevant: untick \u201conly relevant\u201d to see the closest." : "";
        setStatus(`No results.${why}`, "warning");
        return;
      }
      const cut = body.truncated ? " The query was longer than the model's context and was cut." : "";
      const took = Number(body.took_ms).toFixed(0);
      setStatus(`${plural(body.results.length, "result")} ${describe} (${took} ms).${cut}`);
    } catch (error) {
      if (seq === requestSeq) showError(error);
    }
  }

  function searchText() {
    const q = el.query.value.trim();
    const k = readK();
    if (!q) {
      setStatus("Type something to search for.", "warning");
      el.query.focus();
      return;
    }
    if (k === null) return;
    lastAction = searchText;
    const params = el.relevant.checked ? { q, k, min_relevance: MIN_RELEVANCE } : { q, k };
    const url = withParams("/api/search", params);
    runSearch(() => api(url), `Results for \u201c${q}\u201d`, "for your text", el.relevant.checked);
  }

  function searchImage(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      setStatus(`Error: ${file.name} is not an image.`, "error");
      return;
    }
    const k = readK();
    if (k === null) return;
    showPreview(file);
    lastAction = () => searchImage(file);
    const load = () => {
      const form = new FormData();
      form.append("file", file, file.name);
      return api(withParams("/api/search/image", { k }), { method: "POST", body: form });
    };
    runSearch(load, `Similar to ${file.name || "your image"}`, "for your image");
  }

  function showPreview(file) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    el.preview.src = previewUrl;
    el.preview.alt = `Uploaded: ${file.name}`;
    el.preview.hidden = false;
  }

  // --- selected image: more like this, zero-shot labels --------------------------------------------------------

  function selectImage(hit) {
    const k = readK();
    if (k === null) return;
    selectedHit = hit;
    lastAction = () => selectImage(hit);
    el.selected.hidden = false;
    el.selectedImage.src = withParams(hit.thumbnail_url, { size: LARGE_SIZE }, true);
    el.selectedImage.alt = hit.path;
    el.selectedLink.href = withParams(hit.url, {}, true);
    el.selectedOriginal.href = withParams(hit.url, {}, true);
    el.selectedPath.textContent = hit.path;
    const size = hit.width && hit.height ? `${hit.width} \u00d7 ${hit.height} px \u00b7 ` : "";
    el.selectedMeta.textContent = `${size}score ${hit.score.toFixed(3)} \u00b7 id ${hit.id}`;
    el.labelsResult.replaceChildren();
    el.selected.scrollIntoView({ block: "nearest" });
    const url = withParams(`/api/images/${encodeURIComponent(hit.id)}/similar`, { k });
    runSearch(() => api(url), `More like ${hit.path}`, "like this image");
  }

  function renderLabels(scores) {
    const rows = scores.map(({ label, probability }) => {
      const percent = (probability * 100).toFixed(1);
      const row = document.createElement("li");
      row.className = "label-row";
      const name = document.createElement("span");
      name.className = "label-name";
      name.textContent = label;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = `${Math.max(0, Math.min(100, probability * 100))}%`;
      bar.append(fill);
      const value = document.createElement("span");
      value.className = "label-percent";
      value.textContent = `${percent}%`;
      row.append(name, bar, value);
      return row;
    });
    const list = document.createElement("ol");
    list.className = "labels-list";
    list.append(...rows);
    el.labelsResult.replaceChildren(list);
  }

  async function classify() {
    if (!selectedHit) return;
    const labels = el.labels.value
      .split(",")
      .map((label) => label.trim())
      .filter(Boolean);
    if (!labels.length) {
      setStatus("Give at least one label, separated by commas.", "warning");
      el.labels.focus();
      return;
    }
    const hit = selectedHit;
    lastAction = classify;
    setStatus(`Classifying ${hit.path}\u2026`, "busy");
    try {
      const { body } = await api("/api/classify", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ image_id: hit.id, labels }),
      });
      if (selectedHit !== hit) return;
      renderLabels(body.labels);
      setStatus(`Labelled ${hit.path} (${plural(body.templates, "prompt template")} per label).`);
    } catch (error) {
      showError(error);
    }
  }

  // --- wiring --------------------------------------------------------------------------------------------------

  function imageFrom(dataTransfer) {
    const files = Array.from((dataTransfer && dataTransfer.files) || []);
    return files.find((file) => !file.type || file.type.startsWith("image/")) || files[0] || null;
  }

  function hasFiles(event) {
    return Array.from((event.dataTransfer && event.dataTransfer.types) || []).includes("Files");
  }

  function wire() {
    el.searchForm.addEventListener("submit", (event) => {
      event.preventDefault();
      searchText();
    });
    el.upload.addEventListener("change", () => {
      searchImage(el.upload.files && el.upload.files[0]);
    });
    el.classifyForm.addEventListener("submit", (event) => {
      event.preventDefault();
      classify();
    });
    el.keyForm.addEventListener("submit", (event) => {
      event.preventDefault();
      saveKey(el.apiKey.value.trim());
      el.apiKey.value = "";
      el.keyForm.hidden = true;
      const retry = lastAction;
      loadStatus()
        .then(() => retry && retry())
        .catch(showError);
    });

    // Drop an image anywhere on the page; the drop zone lights up while a file is dragged over the window.
    let dragDepth = 0;
    document.addEventListener("dragenter", (event) => {
      if (!hasFiles(event)) return;
      dragDepth += 1;
      el.dropZone.classList.add("dragging");
    });
    document.addEventListener("dragleave", () => {
      dragDepth = Math.max(0, dragDepth - 1);
      if (!dragDepth) el.dropZone.classList.remove("dragging");
    });
    document.addEventListener("dragover", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault(); // allow the drop instead of the browser opening the file
      event.dataTransfer.dropEffect = "copy";
    });
    document.addEventListener("drop", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      dragDepth = 0;
      el.dropZone.classList.remove("dragging");
      const file = imageFrom(event.dataTransfer);
      if (file) searchImage(file);
    });
  }

  wire();
  loadStatus().catch(showError);
})();
