// clip-search web page: text search, search by image (file input or drop), "more like this", zero-shot labels,
// filters (capture dates, folder with suggestions fetched as you type, camera) and order, endless scrolling through
// pages, duplicate groups, and long queries cut at the model's context or read in parts (long_text).
// Plain browser JavaScript, no build step; talks only to this server's JSON API.
"use strict";

(() => {
  const KEY_STORAGE = "clipsearch.apiKey";
  const KEY_HEADER = "X-API-Key";
  const MAX_K = 1000;
  const LARGE_SIZE = 512; // px: thumbnail size for the selected image
  const READY_POLL_MS = 5000; // while not ready or empty: how often the status is checked again
  // "only relevant" text results: the served model's cut-off from /api/stats (default_min_relevance: 0.99 for a
  // CLIP's calibrated relevance, 0.1 for a SigLIP's own probability; app/relevance.py), this until stats arrive.
  let minRelevance = 0.99;
  const MORE_MARGIN_PX = 300; // the next page is fetched once the end of the list comes this close to the viewport
  const FOLDER_LIMIT = 50; // folders offered under a folder box at a time
  const FOLDER_DEBOUNCE_MS = 150; // typing pause before the folders starting with what is typed are asked for
  const LAST_DAY = "9999-12-31"; // the last date the server takes: as "to", no upper bound
  const MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"),
    indexInfo: $("index-info"),
    searchForm: $("search-form"),
    query: $("query"),
    k: $("k"),
    relevant: $("relevant"),
    longText: $("long-text"),
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
    filters: $("filters"),
    takenFrom: $("taken-from"),
    takenTo: $("taken-to"),
    folder: $("folder"),
    folderList: $("folder-list"),
    folderHint: $("folder-hint"),
    camera: $("camera"),
    clearFilters: $("clear-filters"),
    duplicatesForm: $("duplicates-form"),
    threshold: $("threshold"),
    duplicatesFolder: $("duplicates-folder"),
    duplicatesFolderList: $("duplicates-folder-list"),
    duplicatesFolderHint: $("duplicates-folder-hint"),
    groups: $("groups"),
    notice: $("notice"),
    more: $("more"),
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
  let previewUrl = null;
  let selectedHit = null;
  let readyTimer = null;
  let indexSummary = ""; // "12 images indexed (...)": shown beside the status once the status says other things
  let feed = null; // the list being shown, a page at a time (see startFeed)
  let currentSearch = null; // runs the image search being shown again (after a change of filters or order)

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
    if (typeof stats.default_min_relevance === "number") minRelevance = stats.default_min_relevance;
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
    await loadFacets();
  }

  // --- filters and order ---------------------------------------------------------------------------------------

  /** Offer the folders, cameras and capture dates the index holds (GET /api/facets): every camera, the span of the
   * capture dates, and the first folders (those starting with what a folder box holds, when it holds something). */
  async function loadFacets() {
    const { body } = await api(withParams("/api/facets", { limit: FOLDER_LIMIT }));
    for (const suggester of folderSuggesters) {
      if (suggester.input.value.trim()) suggester.ask();
      else suggester.offer(body);
    }
    const chosen = el.camera.value;
    const any = document.createElement("option");
    any.value = "";
    any.textContent = body.cameras.length ? "Any camera" : "No camera data";
    const cameras = body.cameras.map(({ value, images }) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = `${value} (${images})`;
      return option;
    });
    el.camera.replaceChildren(any, ...cameras);
    el.camera.value = body.cameras.some((camera) => camera.value === chosen) ? chosen : "";
    el.camera.disabled = !body.cameras.length;
    for (const input of [el.takenFrom, el.takenTo]) {
      input.min = body.taken ? body.taken.earliest.slice(0, 10) : "";
      input.max = body.taken ? body.taken.latest.slice(0, 10) : "";
    }
  }

  /** Folder suggestions under a folder box (``input``, its ``list`` datalist and its ``hint``): as the user types, after
   * a FOLDER_DEBOUNCE_MS pause, the first FOLDER_LIMIT folders whose path starts with what is typed (GET /api/facets
   * with folder_prefix), and how many more match. Only the answer to the latest request is shown. */
  function folderSuggester(input, list, hint) {
    let timer = null;
    let latest = 0; // number of the latest request (or offer): answers to older ones are dropped

    function showHint(text) {
      hint.textContent = text;
      hint.hidden = !text;
    }

    /** Show the folders of a facets answer (``body.folders``, ``folders_matched``, ``folders_truncated``). */
    function show(body, prefix) {
      list.replaceChildren(
        ...body.folders.map(({ value, images }) => {
          const option = document.createElement("option");
          option.value = value;
          option.label = plural(images, "image");
          return option;
        }),
      );
      const more = body.folders_matched - body.folders.length;
      if (body.folders_truncated && more > 0) showHint(`and ${more.toLocaleString("en-US")} more: type more`);
      else if (prefix && !body.folders_matched) showHint(`No folder starts with \u201c${prefix}\u201d.`);
      else showHint("");
    }

    async function ask() {
      window.clearTimeout(timer);
      const asked = ++latest;
      const prefix = input.value.trim();
      const params = prefix ? { folder_prefix: prefix, limit: FOLDER_LIMIT } : { limit: FOLDER_LIMIT };
      try {
        const { body } = await api(withParams("/api/facets", params));
        if (asked === latest) show(body, prefix);
      } catch (error) {
        if (asked === latest) showHint(`No folder suggestions: ${error.message}`);
      }
    }

    input.addEventListener("input", () => {
      window.clearTimeout(timer);
      timer = window.setTimeout(ask, FOLDER_DEBOUNCE_MS);
    });
    return {
      input,
      ask,
      offer: (body) => {
        window.clearTimeout(timer);
        latest += 1;
        show(body, "");
      },
    };
  }

  const folderSuggesters = [
    folderSuggester(el.folder, el.folderList, el.folderHint),
    folderSuggester(el.duplicatesFolder, el.duplicatesFolderList, el.duplicatesFolderHint),
  ];

  /** [year, month, day] of a date input's value (YYYY-MM-DD; the browser allows years past 9999). */
  function dayParts(day) {
    return day.split("-").map(Number);
  }

  /** Whether the date ``a`` comes after the date ``b`` (both YYYY-MM-DD; years may have more than four digits). */
  function isAfter(a, b) {
    const [x, y] = [dayParts(a), dayParts(b)];
    return (x[0] - y[0] || x[1] - y[1] || x[2] - y[2]) > 0;
  }

  /** The day after a date (YYYY-MM-DD), so that the "to" date is included; counted on the calendar, not with Date,
   * whose range and ISO text stop short of the years a date input allows. */
  function nextDay(day) {
    const [year, month, date] = dayParts(day);
    const leap = year % 4 === 0 && (year % 100 !== 0 || year % 400 === 0);
    const length = month === 2 && leap ? 29 : MONTH_DAYS[month - 1];
    const [y, m, d] = date < length ? [year, month, date + 1] : month < 12 ? [year, month + 1, 1] : [year + 1, 1, 1];
    const two = (number) => String(number).padStart(2, "0");
    return `${String(y).padStart(4, "0")}-${two(m)}-${two(d)}`;
  }

  /** The filter and order parameters of an image search, or null after telling the user what is wrong. */
  function readFilters() {
    const from = el.takenFrom.value;
    const to = el.takenTo.value;
    if (from && to && isAfter(from, to)) {
      setStatus("Error: the \u201cfrom\u201d date is after the \u201cto\u201d date: swap them.", "error");
      el.takenFrom.focus();
      return null;
    }
    const params = {};
    if (from) params.taken_after = from;
    // the server takes years 0001 to 9999 and says so for others; the last day of 9999 as "to" is no bound at all
    if (to && to !== LAST_DAY) params.taken_before = nextDay(to);
    const folder = el.folder.value.trim();
    if (folder) params.folder = folder;
    if (el.camera.value) params.camera = el.camera.value;
    const sort = el.filters.querySelector('input[name="sort"]:checked').value;
    if (sort !== "relevance") params.sort = sort;
    return params;
  }

  function hasFilters() {
    return Boolean(el.takenFrom.value || el.takenTo.value || el.folder.value.trim() || el.camera.value);
  }

  /** Run the image search being shown again, for new filters or order. */
  function refresh() {
    if (currentSearch && feed && feed.kind === "search") currentSearch();
  }

  // --- results grid --------------------------------------------------------------------------------------------

  /** The k input as an integer 1..1000, or null after telling the user what is wrong. */
  function readK() {
    const k = Number(el.k.value);
    if (!Number.isInteger(k) || k < 1 || k > MAX_K) {
      setStatus(`Error: the number per page must be a whole number from 1 to ${MAX_K}.`, "error");
      el.k.focus();
      return null;
    }
    return k;
  }

  function resultItem(hit) {
    const item = document.createElement("li");
    item.className = "result";
    item.dataset.id = String(hit.id);
    const taken = hit.taken_at ? hit.taken_at.slice(0, 10) : "";
    item.title = `${hit.path} (score ${hit.score.toFixed(3)}${taken ? `, taken ${taken}` : ""})`;
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

    const path = document.createElement("span");
    path.className = "path";
    path.textContent = hit.path;
    const details = document.createElement("span");
    details.className = "details";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    details.append(score);
    if (taken) {
      const date = document.createElement("time");
      date.className = "taken";
      date.dateTime = hit.taken_at;
      date.textContent = taken;
      date.title = hit.taken_from_exif ? "taken (EXIF)" : "file date (no EXIF)";
      details.append(date);
    }

    button.append(image, path, details);
    item.append(button);
    return item;
  }

  function showHeading(heading) {
    el.heading.textContent = heading;
    el.heading.hidden = false;
  }

  /** Show one list a page at a time: ``spec`` gives its ``kind`` ("search" or "duplicates"), ``load(cursor)``
   * (the API call for a page; cursor null: the first), ``render(body, append)`` (returns how many items it added),
   * and ``report(body, shown)`` (the status line after a page, ``shown`` items in all). Only the latest list
   * (``feed``) may render; later pages come as its
   * end nears the viewport. A cursor the server no longer takes (409: the index changed) starts it again. */
  function startFeed(spec, notice = "") {
    feed = { ...spec, spec, cursor: null, busy: false, failed: false, shown: 0 };
    el.notice.textContent = notice;
    el.notice.hidden = !notice;
    el.more.hidden = true;
    setStatus(spec.busy || "Searching\u2026", "busy");
    return loadPage(feed, true);
  }

  async function loadPage(current, first) {
    current.busy = true;
    if (!first) showMore("Loading more\u2026", "loading");
    try {
      const { body } = await current.load(first ? null : current.cursor);
      if (current !== feed) return;
      current.cursor = body.next_cursor || null;
      current.shown += current.render(body, !first);
      current.busy = false;
      current.report(body, current.shown);
      showMore(current.cursor ? "" : current.shown ? "No more results." : "", current.cursor ? "more" : "end");
      window.requestAnimationFrame(() => loadMoreIfNear());
    } catch (error) {
      if (current !== feed) return;
      current.busy = false;
      if (!first && error instanceof ApiError && error.status === 409) {
        // the index was republished since the first page: its cursors no longer hold, so start again
        loadFacets().catch(() => {});
        startFeed(current.spec, "The index was updated while you scrolled: the list was fetched again.");
        return;
      }
      current.failed = !first;
      if (!first) showMore(`Could not load more: ${error.message}`, "error");
      showError(error);
    }
  }

  function showMore(text, state) {
    el.more.textContent = text;
    el.more.dataset.state = state;
    el.more.hidden = state === "end" && !text;
  }

  /** Fetch the next page when the end of the list is within MORE_MARGIN_PX of the viewport. */
  function loadMoreIfNear() {
    const current = feed;
    if (!current || !current.cursor || current.busy || current.failed) return;
    if (el.more.getBoundingClientRect().top <= window.innerHeight + MORE_MARGIN_PX) loadPage(current, false);
  }

  /** Run an image search (``load(params)``: the API call with the page's parameters) with the filters and order. */
  function startSearch(load, heading, describe, cutOff = false) {
    const filters = readFilters();
    if (filters === null) return;
    const filtered = hasFilters();
    const spec = {
      kind: "search",
      load: (cursor) => load(cursor ? { ...filters, cursor } : filters),
      render: (body, append) => {
        if (!append) {
          showHeading(heading);
          el.groups.hidden = true;
          el.results.hidden = false;
        }
        const items = body.results.map(resultItem);
        if (append) el.results.append(...items);
        else el.results.replaceChildren(...items);
        return items.length;
      },
      report: (body, shown) => {
        if (!shown) {
          const why = cutOff
            ? " Nothing indexed looks relevant: untick \u201conly relevant\u201d to see the closest."
            : filtered
              ? " No image matches the filters: widen or clear them."
              : "";
          setStatus(`No results.${why}`, "warning");
          return;
        }
        const cut = body.truncated
          ? " The query was longer than the model's context and was cut (\u201cread it all\u201d uses every word)."
          : "";
        const parts = body.chunks > 1 ? ` Read in ${body.chunks} parts.` : "";
        const took = Number(body.took_ms).toFixed(0);
        setStatus(`${plural(shown, "result")} ${describe} (${took} ms).${cut}${parts}`);
      },
    };
    startFeed(spec);
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
    currentSearch = searchText;
    const relevant = el.relevant.checked;
    const base = { q, k };
    if (relevant) base.min_relevance = minRelevance;
    if (el.longText.value) base.long_text = el.longText.value; // none: the server's setting (CLIPSEARCH_LONG_TEXT)
    const load = (params) => api(withParams("/api/search", { ...base, ...params }));
    startSearch(load, `Results for \u201c${q}\u201d`, "for your text", relevant);
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
    currentSearch = lastAction;
    const load = (params) => {
      const form = new FormData();
      form.append("file", file, file.name);
      return api(withParams("/api/search/image", { k, ...params }), { method: "POST", body: form });
    };
    startSearch(load, `Similar to ${file.name || "your image"}`, "for your image");
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
    searchSimilar(hit);
  }

  function searchSimilar(hit) {
    const k = readK();
    if (k === null) return;
    currentSearch = () => searchSimilar(hit);
    const load = (params) => api(withParams(`/api/images/${encodeURIComponent(hit.id)}/similar`, { k, ...params }));
    startSearch(load, `More like ${hit.path}`, "like this image");
  }

  // --- duplicates ----------------------------------------------------------------------------------------------

  function memberItem(member) {
    const item = document.createElement("li");
    item.className = "result member";
    item.dataset.id = String(member.id);
    item.dataset.kind = member.kind;
    const link = document.createElement("a");
    link.className = "card";
    link.href = withParams(`/api/images/${encodeURIComponent(member.id)}/file`, {}, true);
    link.target = "_blank";
    link.rel = "noopener";
    link.title = `${member.path}: open the original`;
    const image = document.createElement("img");
    image.src = withParams(`/api/images/${encodeURIComponent(member.id)}/thumbnail`, {}, true);
    image.alt = member.path;
    image.loading = "lazy";
    image.decoding = "async";
    image.addEventListener("error", () => item.classList.add("broken"));
    const path = document.createElement("span");
    path.className = "path";
    path.textContent = member.path;
    const details = document.createElement("span");
    details.className = "details";
    const similarity = document.createElement("span");
    similarity.className = "score";
    similarity.textContent = member.similarity.toFixed(3);
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = member.kind === "exact" ? "same bytes" : "similar";
    details.append(similarity, kind);
    link.append(image, path, details);
    item.append(link);
    return item;
  }

  function groupItem(group) {
    const item = document.createElement("li");
    item.className = "group";
    item.dataset.kind = group.kind;
    const head = document.createElement("p");
    head.className = "group-head";
    const what = group.kind === "exact" ? "identical files" : "near-duplicates";
    head.textContent = `${group.members.length} ${what}`;
    const members = document.createElement("ul");
    members.className = "grid members";
    members.append(...group.members.map(memberItem));
    item.append(head, members);
    return item;
  }

  function findDuplicates() {
    const k = readK();
    if (k === null) return;
    const params = { page_size: k };
    const threshold = el.threshold.value.trim();
    if (threshold) params.threshold = threshold;
    const folder = el.duplicatesFolder.value.trim();
    if (folder) params.folder = folder;
    lastAction = findDuplicates;
    currentSearch = null;
    startFeed({
      kind: "duplicates",
      busy: "Comparing the images\u2026",
      load: (cursor) => api(withParams("/api/duplicates", cursor ? { ...params, cursor } : params)),
      render: (body, append) => {
        if (!append) {
          const where = body.folder ? ` in ${body.folder}` : "";
          showHeading(`Duplicates at similarity \u2265 ${body.threshold}${where}`);
          el.results.hidden = true;
          el.results.replaceChildren();
          el.groups.hidden = false;
        }
        const items = body.groups.map(groupItem);
        if (append) el.groups.append(...items);
        else el.groups.replaceChildren(...items);
        return items.length;
      },
      report: (body, shown) => {
        const among = `among ${plural(body.images, "image")}`;
        if (!body.total_groups) {
          setStatus(`No duplicates ${among} at this similarity.`, "warning");
          return;
        }
        const took = Number(body.took_ms).toFixed(0);
        setStatus(`${shown} of ${plural(body.total_groups, "group")} of duplicates ${among} (${took} ms).`);
      },
    });
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
    el.duplicatesForm.addEventListener("submit", (event) => {
      event.preventDefault();
      findDuplicates();
    });
    for (const control of [el.takenFrom, el.takenTo, el.folder, el.camera]) {
      control.addEventListener("change", refresh);
    }
    for (const radio of el.filters.querySelectorAll('input[name="sort"]')) radio.addEventListener("change", refresh);
    el.longText.addEventListener("change", () => currentSearch === searchText && refresh());
    el.clearFilters.addEventListener("click", () => {
      const had = hasFilters();
      el.takenFrom.value = "";
      el.takenTo.value = "";
      if (el.folder.value) {
        el.folder.value = "";
        folderSuggesters[0].ask();
      }
      el.camera.value = "";
      if (had) refresh();
    });
    // the next page loads when the end of the list scrolls near the viewport (and, after each page, while it is)
    const margin = { rootMargin: `0px 0px ${MORE_MARGIN_PX}px 0px` };
    new IntersectionObserver((entries) => entries.some((entry) => entry.isIntersecting) && loadMoreIfNear(), margin)
      .observe(el.more);
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
