// The zhiku page: chat with sources, and knowledge-base management with upload jobs.
// Everything shown from the server (answers, passages, file names, errors) is set as text.
import { applyStaticStrings, currentLanguage, setLanguage, t } from "./i18n.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const STORE = "zhiku.conversations";
const state = { kbChoice: null, caller: null, conversations: [], current: null, controller: null, openKb: null, jobs: new Map() };

// ---------------------------------------------------------------- HTTP

function headers(extra = {}) {
  const key = localStorage.getItem("zhiku.key");
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (response.status === 401) askForKey();
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.status === 204 ? null : response.json();
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || `${response.status} ${response.statusText}`;
  } catch { return `${response.status} ${response.statusText}`; }
}

// Server-Sent Events over fetch (EventSource cannot send the API key): yields each data payload.
async function* events(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (!signal?.aborted) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

// ---------------------------------------------------------------- auth

function askForKey() {
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
}

async function loadCaller() {
  state.caller = await api("/v1/caller");
  $("key-button").hidden = !state.caller.keys_required;
  document.body.classList.toggle("not-admin", !state.caller.admin);
  if (state.caller.keys_required && !state.caller.authenticated) askForKey();
  return state.caller.authenticated;
}

function canWrite(kb) {
  const c = state.caller;
  return c && (c.admin || (c.writable || []).includes(kb));
}

// ---------------------------------------------------------------- chat

function saveConversations() { localStorage.setItem(STORE, JSON.stringify(state.conversations)); }

function loadConversations() {
  try { state.conversations = JSON.parse(localStorage.getItem(STORE)) || []; } catch { state.conversations = []; }
  state.current = state.conversations[0] || newConversation();
}

function newConversation() {
  const conversation = { id: String(Date.now()), title: "", messages: [] };
  state.conversations.unshift(conversation);
  state.current = conversation;
  saveConversations();
  return conversation;
}

function renderConversationList() {
  const list = $("conversation-list");
  list.replaceChildren();
  for (const c of state.conversations) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = c.title || t("new_chat");
    button.classList.toggle("active", c === state.current);
    button.addEventListener("click", () => { state.current = c; renderChat(); });
    item.append(button);
    list.append(item);
  }
}

function renderChat() {
  renderConversationList();
  const box = $("messages");
  box.replaceChildren(...state.current.messages.map(messageElement));
  box.scrollTop = box.scrollHeight;
  const last = [...state.current.messages].reverse().find((m) => m.sources);
  renderSources(last?.sources || []);
}

function messageElement(message) {
  const el = document.createElement("article");
  el.className = `message ${message.role}`;
  const body = document.createElement("div");
  body.className = "body";
  if (message.role === "assistant") {
    body.append(renderMarkdown(message.content, (n) => citation(n, message)));
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "quiet copy";
    copy.textContent = t("copy");
    copy.addEventListener("click", () => copyText(message.content, copy));
    el.append(body, copy);
  } else {
    body.textContent = message.content;
    el.append(body);
  }
  return el;
}

function citation(n, message) {
  const a = document.createElement("a");
  a.href = "#";
  a.className = "cite";
  a.textContent = `[${n}]`;
  a.dataset.n = String(n);
  a.addEventListener("click", (event) => {
    event.preventDefault();
    renderSources(message.sources || [], n);
  });
  return a;
}

async function copyText(text, button) {
  try { await navigator.clipboard.writeText(text); } catch {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = t("copied");
  setTimeout(() => { button.textContent = t("copy"); }, 1500);
}

function passageElement(p, highlighted) {
  const item = document.createElement("li");
  item.id = `source-${p.index}`;
  item.classList.toggle("highlight", p.index === highlighted);
  const head = document.createElement("div");
  head.className = "passage-head";
  const ocr = p.ocr_pages?.length ? t("ocr_pages", { pages: p.ocr_pages.join(", ") }) : null;
  const where = [p.source, p.page != null ? t("page", { n: p.page }) : null, ocr].filter(Boolean).join(" · ");
  head.textContent = `[${p.index}] ${where} · ${t("score")} ${Number(p.score).toFixed(3)}`;
  const text = document.createElement("p");
  text.textContent = p.text;
  item.append(head, text);
  return item;
}

function renderSources(sources, highlighted = null) {
  const list = $("source-list");
  list.replaceChildren(...sources.map((p) => passageElement(p, highlighted)));
  if (highlighted != null) $(`source-${highlighted}`)?.scrollIntoView({ block: "nearest" });
}

async function loadChatChoices() {
  const [models, kbs] = await Promise.all([api("/v1/models"), api("/v1/knowledge_bases")]);
  const modelSelect = $("model-select");
  modelSelect.replaceChildren(...models.data.filter((m) => m.kind === "chat" && !m.knowledge_base).map((m) => option(m.id, m.id)));
  const kbSelect = $("kb-select");
  const chosen = state.kbChoice; // what the user picked, "" for none; until then the first knowledge base
  kbSelect.replaceChildren(option("", t("no_kb")), ...kbs.data.map((kb) => option(kb.name, kb.name)));
  kbSelect.value = chosen != null && [...kbSelect.options].some((o) => o.value === chosen) ? chosen : (kbs.data[0]?.name || "");
}

function option(value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  return o;
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || state.controller) return;
  $("prompt").value = "";
  $("chat-error").textContent = "";
  const conversation = state.current;
  conversation.messages.push({ role: "user", content: prompt });
  if (!conversation.title) conversation.title = prompt.slice(0, 40);
  const answer = { role: "assistant", content: "", sources: [] };
  const history = conversation.messages.map(({ role, content }) => ({ role, content }));
  conversation.messages.push(answer);
  renderChat();
  const body = {
    model: $("model-select").value,
    messages: history,
    stream: true,
    knowledge_base: $("kb-select").value || null,
    top_k: Number($("top-k").value) || undefined,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value) || undefined,
  };
  state.controller = new AbortController();
  setGenerating(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (response.status === 401) askForKey();
    if (!response.ok) throw new Error(await errorMessage(response));
    let pending = false;
    for await (const data of events(response, state.controller.signal)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.sources) { answer.sources = chunk.sources; renderSources(answer.sources); }
      answer.content += chunk.choices?.[0]?.delta?.content || "";
      if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; updateLastAnswer(answer); }); }
    }
  } catch (error) {
    if (error.name === "AbortError") answer.content += ` ${t("stopped")}`;
    else $("chat-error").textContent = error.message;
  } finally {
    state.controller = null;
    setGenerating(false);
    saveConversations();
    renderChat();
  }
}

function updateLastAnswer(answer) {
  const box = $("messages");
  box.lastElementChild?.replaceWith(messageElement(answer));
  box.scrollTop = box.scrollHeight;
}

function setGenerating(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

// ---------------------------------------------------------------- knowledge bases

async function loadKnowledgeBases() {
  $("kb-error").textContent = "";
  const kbs = await api("/v1/knowledge_bases");
  const rows = $("kb-rows");
  rows.replaceChildren(...kbs.data.map(kbRow));
  if (!kbs.data.length) rows.append(emptyRow(5));
}

function kbRow(kb) {
  const row = document.createElement("tr");
  row.append(cell(kb.name), cell(kb.documents), cell(kb.chunks), cell(kb.backend));
  const actions = document.createElement("td");
  actions.append(button(t("open"), () => openKnowledgeBase(kb.name)));
  if (state.caller.admin) actions.append(button(t("delete"), () => deleteKnowledgeBase(kb.name), "danger"));
  row.append(actions);
  return row;
}

function cell(value) {
  const td = document.createElement("td");
  td.textContent = value == null ? "" : String(value);
  return td;
}

function emptyRow(span) {
  const row = document.createElement("tr");
  const td = cell(t("empty"));
  td.colSpan = span;
  row.append(td);
  return row;
}

function button(label, onClick, className = "") {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (className) b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

const kbPath = (kb) => `/v1/knowledge_bases/${encodeURIComponent(kb)}`;

async function createKnowledgeBase(event) {
  event.preventDefault();
  const name = $("new-kb-name").value.trim();
  try {
    await api("/v1/knowledge_bases", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name }) });
    $("new-kb-name").value = "";
    await loadKnowledgeBases();
    await openKnowledgeBase(name);
  } catch (error) { $("kb-error").textContent = error.message; }
}

async function deleteKnowledgeBase(name) {
  if (!confirm(t("confirm_delete_kb", { name }))) return;
  try {
    await api(kbPath(name), { method: "DELETE" });
    if (state.openKb === name) { state.openKb = null; $("kb-detail").hidden = true; }
    await loadKnowledgeBases();
  } catch (error) { $("kb-error").textContent = error.message; }
}

async function openKnowledgeBase(name) {
  state.openKb = name;
  $("kb-detail").hidden = false;
  $("kb-title").textContent = name;
  $("drop-zone").hidden = !canWrite(name);
  $("search-results").replaceChildren();
  $("jobs").replaceChildren();
  await loadDocuments();
  const jobs = await api(`${kbPath(name)}/jobs`);
  for (const job of jobs.data.slice(0, 5).reverse()) showJob(job);
  for (const job of jobs.data) if (job.state === "queued" || job.state === "running") followJob(job);
}

async function loadDocuments() {
  const kb = state.openKb;
  const documents = await api(`${kbPath(kb)}/documents`);
  const rows = $("document-rows");
  rows.replaceChildren(...documents.data.map((d) => documentRow(kb, d)));
  if (!documents.data.length) rows.append(emptyRow(6));
}

function documentRow(kb, d) {
  const row = document.createElement("tr");
  const ocr = d.ocr_pages?.length ? ` · ${t("ocr_pages", { pages: d.ocr_pages.join(", ") })}` : "";
  const status = cell((d.error ? `${t(d.status)}: ${d.error}` : t(d.status)) + ocr);
  status.className = `status-${d.status}`;
  const date = d.modified ? new Date(d.modified * 1000).toLocaleString(currentLanguage() === "zh" ? "zh-CN" : "en") : "";
  row.append(cell(d.path), status, cell(d.chunk_count), cell(formatSize(d.size)), cell(date));
  const actions = document.createElement("td");
  if (canWrite(kb)) actions.append(button(t("delete"), () => deleteDocument(kb, d), "danger"));
  row.append(actions);
  return row;
}

function formatSize(bytes) {
  if (bytes == null) return "";
  const units = ["B", "KB", "MB", "GB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

async function deleteDocument(kb, d) {
  if (!confirm(t("confirm_delete_doc", { name: d.path }))) return;
  try {
    await api(`${kbPath(kb)}/documents/${d.id}`, { method: "DELETE" });
    await loadDocuments();
  } catch (error) { $("kb-error").textContent = error.message; }
}

async function searchKnowledgeBase(event) {
  event.preventDefault();
  const query = $("search-query").value.trim();
  if (!query) return;
  const list = $("search-results");
  try {
    const result = await api(`${kbPath(state.openKb)}/search`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ query, top_k: Number($("top-k").value) || 5 }),
    });
    list.replaceChildren(...result.data.map((p) => passageElement(p, null)));
    if (!result.data.length) list.append(cell(t("no_results")));
  } catch (error) { $("kb-error").textContent = error.message; }
}

// ---------------------------------------------------------------- uploads and jobs

const UPLOAD_FILES_PER_REQUEST = 200;

// A big selection (a folder of thousands of files) goes up as several requests, each under the
// server's size limit, so one broken or oversized file never fails the rest.
function uploadBatches(files, limit) {
  const budget = Math.max(limit - 64 * 1024, 1); // room for the multipart framing
  const batches = [];
  let batch = [], bytes = 0;
  for (const file of files) {
    if (batch.length && (bytes + file.size > budget || batch.length >= UPLOAD_FILES_PER_REQUEST)) {
      batches.push(batch);
      batch = [];
      bytes = 0;
    }
    batch.push(file);
    bytes += file.size;
  }
  if (batch.length) batches.push(batch);
  return batches;
}

async function upload(files) {
  const kb = state.openKb;
  if (!files.length || !kb) return;
  for (const batch of uploadBatches(files, state.caller.max_upload_bytes)) await uploadBatch(kb, batch);
}

function uploadBatch(kb, files) {
  const form = new FormData();
  for (const file of files) form.append("files", file, file.webkitRelativePath || file.name);
  const card = jobCard(`upload-${Date.now()}-${Math.random().toString(36).slice(2)}`);
  card.title.textContent = `${t("uploading")} · ${files.length} ${t("files")}`;
  const request = new XMLHttpRequest();
  request.open("POST", `${kbPath(kb)}/documents`);
  for (const [name, value] of Object.entries(headers())) request.setRequestHeader(name, value);
  request.upload.addEventListener("progress", (e) => { if (e.lengthComputable) setProgress(card.bar, e.loaded, e.total); });
  card.cancel.addEventListener("click", () => request.abort(), { once: true });
  return new Promise((resolve) => {
    request.addEventListener("loadend", resolve);
    request.addEventListener("abort", () => { card.title.textContent = t("cancelled"); card.cancel.hidden = true; });
    request.addEventListener("error", () => { card.title.textContent = `${t("failed")}: network error`; card.cancel.hidden = true; });
    request.addEventListener("load", () => {
      let body = null;
      try { body = JSON.parse(request.responseText); } catch { /* not JSON: shown below */ }
      if (request.status === 202 && body) {
        card.root.remove();
        showJob(body);
        followJob(body);
      } else {
        card.root.dataset.state = "failed";
        card.title.textContent = `${t("failed")}: ${body?.error?.message || request.status}`;
        card.cancel.hidden = true;
      }
    });
    request.send(form);
  });
}

function jobCard(id) {
  let root = document.getElementById(id);
  if (!root) {
    root = document.createElement("div");
    root.className = "job";
    root.id = id;
    $("jobs").prepend(root);
  }
  root.replaceChildren();
  const title = document.createElement("div");
  title.className = "job-title";
  const bar = document.createElement("progress");
  bar.max = 1; bar.value = 0;
  const cancel = button(t("cancel"), () => {}, "quiet");
  const files = document.createElement("ul");
  files.className = "job-files";
  root.append(title, bar, cancel, files);
  return { root, title, bar, cancel, files };
}

function setProgress(bar, done, total) {
  bar.max = Math.max(total, 1);
  bar.value = done;
}

function showJob(job) {
  state.jobs.set(job.id, job);
  const card = jobCard(job.id);
  card.root.dataset.state = job.state;
  const chunks = (job.chunks_total ? ` · ${job.chunks_embedded}/${job.chunks_total} ${t("chunks")}` : "")
    + (job.ocr_pages_read ? ` · OCR ${job.ocr_pages_read}` : "");
  card.title.textContent = `${t(job.state)} · ${job.files_done}/${job.files_total} ${t("files")}${chunks}${job.error ? ` · ${job.error}` : ""}`;
  setProgress(card.bar, job.state === "done" ? 1 : job.files_done, job.state === "done" ? 1 : job.files_total);
  card.cancel.hidden = !(job.state === "queued" || job.state === "running") || !canWrite(job.knowledge_base);
  card.cancel.addEventListener("click", () => cancelJob(job), { once: true });
  if ((job.state === "failed" || job.state === "cancelled") && canWrite(job.knowledge_base) && job.error?.startsWith("interrupted")) {
    card.root.append(button(t("retry"), () => retryJob(job), "quiet"));
  }
  card.files.replaceChildren(...job.files.map((f) => {
    const item = document.createElement("li");
    item.className = `file-${f.state}`;
    const progress = document.createElement("progress");
    progress.max = 1;
    progress.value = f.state === "waiting" ? 0 : 1;
    const label = document.createElement("span");
    label.textContent = `${f.name} — ${t(f.state)}${f.error ? `: ${f.error}` : ""}`;
    item.append(progress, label);
    return item;
  }));
}

async function followJob(job) {
  try {
    const response = await fetch(`${kbPath(job.knowledge_base)}/jobs/${job.id}/events`, { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of events(response)) {
      const update = JSON.parse(data);
      showJob(update);
      if (update.state !== "queued" && update.state !== "running") break;
    }
  } catch (error) { $("kb-error").textContent = error.message; }
  if (state.openKb === job.knowledge_base) await loadDocuments();
  await loadKnowledgeBases();
}

async function cancelJob(job) {
  try { showJob(await api(`${kbPath(job.knowledge_base)}/jobs/${job.id}`, { method: "DELETE" })); }
  catch (error) { $("kb-error").textContent = error.message; }
}

async function retryJob(job) {
  try {
    const retried = await api(`${kbPath(job.knowledge_base)}/jobs/${job.id}/retry`, { method: "POST" });
    showJob(retried);
    followJob(retried);
  } catch (error) { $("kb-error").textContent = error.message; }
}

// Folders dropped on the page: walk them (the File System Entries API) into files.
async function droppedFiles(items) {
  const files = [];
  async function walk(entry, prefix) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      files.push(new File([file], prefix + file.name, { type: file.type }));
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      let batch;
      do {
        batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
      } while (batch.length);
    }
  }
  const entries = [...items].map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  for (const entry of entries) await walk(entry, "");
  return files;
}

// ---------------------------------------------------------------- wiring

function showView(name) {
  $("chat-view").hidden = name !== "chat";
  $("kbs-view").hidden = name !== "kbs";
  $("tab-chat").classList.toggle("active", name === "chat");
  $("tab-kbs").classList.toggle("active", name === "kbs");
  location.hash = name;
  (name === "kbs" ? loadKnowledgeBases() : loadChatChoices()).catch((e) => { $("kb-error").textContent = e.message; });
}

function wire() {
  $("tab-chat").addEventListener("click", () => showView("chat"));
  $("tab-kbs").addEventListener("click", () => showView("kbs"));
  $("lang-button").addEventListener("click", () => {
    setLanguage(currentLanguage() === "zh" ? "en" : "zh");
    $("lang-button").textContent = currentLanguage() === "zh" ? "English" : "中文";
    renderChat();
    loadChatChoices().catch(() => {});
    if (!$("kbs-view").hidden) loadKnowledgeBases().catch(() => {});
  });
  $("key-button").addEventListener("click", askForKey);
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    localStorage.setItem("zhiku.key", $("key-input").value.trim());
    if (await loadCaller().catch(() => false)) {
      $("key-error").textContent = "";
      $("key-dialog").close();
      showView(location.hash === "#kbs" ? "kbs" : "chat");
    } else $("key-error").textContent = t("key_invalid");
  });
  $("new-chat").addEventListener("click", () => { newConversation(); renderChat(); });
  $("chat-form").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("kb-select").addEventListener("change", (e) => { state.kbChoice = e.target.value; });
  $("create-kb").addEventListener("submit", createKnowledgeBase);
  $("search-form").addEventListener("submit", searchKnowledgeBase);
  $("file-input").addEventListener("change", (e) => { upload([...e.target.files]); e.target.value = ""; });
  $("folder-input").addEventListener("change", (e) => { upload([...e.target.files]); e.target.value = ""; });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const items = e.dataTransfer.items;
    upload(items?.length && items[0].webkitGetAsEntry ? await droppedFiles(items) : [...e.dataTransfer.files]);
  });
}

async function start() {
  applyStaticStrings();
  $("lang-button").textContent = currentLanguage() === "zh" ? "English" : "中文";
  wire();
  loadConversations();
  renderChat();
  if (await loadCaller().catch((e) => { $("chat-error").textContent = e.message; return false; })) {
    showView(location.hash === "#kbs" ? "kbs" : "chat");
  }
  document.body.dataset.ready = "true";
}

start();
