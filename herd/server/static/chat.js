// The chat page: conversations kept in localStorage, answers streamed from /v1/chat/completions (server-sent events)
// and rendered as Markdown (markdown.js), images attached as data: URLs in image_url parts, and under each answer its
// token count, decode speed and time to first token as this browser measured them.
"use strict";
const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), status = $("status");
const SETTINGS = ["system", "temperature", "max_tokens", "apikey"];
const SETTINGS_KEY = "herd-chat", CONVERSATIONS_KEY = "herd-conversations";
const MAX_IMAGE_BYTES = 8 * 2 ** 20;
let modelName = null, controller = null, attachments = [];

// -- storage ------------------------------------------------------------------------------------------------------
const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
for (const k of SETTINGS) if (saved[k] !== undefined) $(k).value = saved[k];
function persistSettings() {
  const s = {};
  for (const k of SETTINGS) s[k] = $(k).value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(s));
}
for (const k of SETTINGS) $(k).addEventListener("change", persistSettings);

// {current: id | null, list: [{id, title, messages: [{role, content, stats?}], updated}]}, newest first.
let store = (() => {
  try {
    const s = JSON.parse(localStorage.getItem(CONVERSATIONS_KEY) || "null");
    if (s && Array.isArray(s.list)) return s;
  } catch (e) { /* an unreadable store starts afresh */ }
  return {current: null, list: []};
})();

function persist() {
  try {
    localStorage.setItem(CONVERSATIONS_KEY, JSON.stringify(store));
  } catch (e) {
    status.textContent = "this conversation is too large for the browser's storage: it will not survive a reload";
  }
}
const conversation = () => store.list.find((c) => c.id === store.current) || null;
const messages = () => (conversation() || {messages: []}).messages;

function startConversation(firstText) {
  const c = {id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6),
             title: firstText.slice(0, 60) || "(image)", messages: [], updated: Date.now()};
  store.list.unshift(c);
  store.current = c.id;
  return c;
}

// -- rendering ----------------------------------------------------------------------------------------------------
const textOf = (content) => typeof content === "string" ? content :
  content.filter((p) => p.type === "text").map((p) => p.text).join("\n");
const imagesOf = (content) => typeof content === "string" ? [] :
  content.filter((p) => p.type === "image_url").map((p) => p.image_url.url);

function showMarkdown(body, text) {
  body.innerHTML = renderMarkdown(text);
  for (const a of body.querySelectorAll("a")) { a.target = "_blank"; a.rel = "noopener noreferrer"; }
}

function showStats(div, stats) {
  let el = div.querySelector(".stats");
  if (!stats) { if (el) el.remove(); return; }
  if (!el) { el = document.createElement("div"); el.className = "stats"; div.append(el); }
  const parts = [];
  if (stats.tokens != null) parts.push(`${stats.tokens} tokens`);
  if (stats.tps != null) parts.push(`${stats.tps.toFixed(1)} tokens/s`);
  if (stats.ttft_ms != null) parts.push(`first token after ${(stats.ttft_ms / 1000).toFixed(2)} s`);
  if (stats.stopped) parts.push("stopped");
  el.textContent = parts.join(" · ");
  el.title = "tokens/s: the answer's tokens after the first, over the time from the first to the last; " +
             "first token: from sending the request to the first piece of text (both measured in this browser)";
  el.dataset.tokens = stats.tokens ?? "";
  el.dataset.tps = stats.tps ?? "";
  el.dataset.ttftMs = stats.ttft_ms ?? "";
}

function bubble(message) {
  const div = document.createElement("div");
  div.className = "msg " + message.role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = message.role;
  const body = document.createElement("div");
  body.className = "body";
  div.append(label, body);
  if (message.role === "assistant") {
    showMarkdown(body, textOf(message.content));
    showStats(div, message.stats);
  } else {
    body.textContent = textOf(message.content);
    const urls = imagesOf(message.content);
    if (urls.length) {
      const strip = document.createElement("div");
      strip.className = "images";
      for (const url of urls) {
        const img = document.createElement("img");
        img.src = url;
        img.alt = "attached image";
        strip.append(img);
      }
      div.append(strip);
    }
  }
  log.append(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function renderConversations() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of store.list) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    if (c.id === store.current) li.className = "active";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title;
    open.title = c.title;
    open.addEventListener("click", () => { if (!controller) { store.current = c.id; persist(); render(); } });
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "×";
    del.title = "Delete this conversation";
    del.addEventListener("click", () => {
      if (controller && c.id === store.current) controller.abort();
      store.list = store.list.filter((x) => x.id !== c.id);
      if (store.current === c.id) store.current = null;
      persist();
      render();
    });
    li.append(open, del);
    ul.append(li);
  }
}

function render() {
  log.replaceChildren();
  for (const m of messages()) bubble(m);
  renderConversations();
  busy(Boolean(controller));
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("regen").disabled = on || !messages().length;  // also after a failed answer: it asks again
}

// -- the server ---------------------------------------------------------------------------------------------------
function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("apikey").value) h["Authorization"] = "Bearer " + $("apikey").value;
  return h;
}

async function errorOf(r) {
  const body = await r.json().catch(() => ({}));
  return new Error(body.error ? body.error.message : `${r.status} ${r.statusText}`);
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    if (!r.ok) throw await errorOf(r);
    modelName = (await r.json()).data[0].id;
    $("model").textContent = modelName;
    status.textContent = "";
  } catch (e) {
    modelName = null;
    $("model").textContent = "(model unknown)";
    status.textContent = e.message;
  }
}

// The server-sent events of a response body, one parsed `data:` object at a time, until [DONE].
async function* events(response) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        if (line === "data: [DONE]") return;
        yield JSON.parse(line.slice(6));
      }
    }
  }
}

async function reply() {
  if (!modelName) await loadModel();
  const conv = conversation();
  const wire = [];
  if ($("system").value.trim()) wire.push({role: "system", content: $("system").value});
  for (const m of conv.messages) wire.push({role: m.role, content: m.content});
  const request = {model: modelName || "", messages: wire, stream: true, stream_options: {include_usage: true},
                   temperature: Number($("temperature").value), max_tokens: Number($("max_tokens").value)};
  const message = {role: "assistant", content: ""};
  const div = bubble(message), body = div.querySelector(".body");
  let text = "", tokens = null, tFirst = null, tLast = null;
  controller = new AbortController();
  busy(true);
  status.textContent = "generating…";
  const t0 = performance.now();
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(request),
                                                   signal: controller.signal});
    if (!r.ok) throw await errorOf(r);
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const delta = chunk.choices && chunk.choices.length ? chunk.choices[0].delta : {};
      if (delta.content) {
        tLast = performance.now();
        if (tFirst === null) tFirst = tLast;
        text += delta.content;
        showMarkdown(body, text);
        log.scrollTop = log.scrollHeight;
      }
    }
    status.textContent = "";
  } catch (e) {
    if (e.name === "AbortError") {
      status.textContent = "stopped";
      message.stats = {ttft_ms: tFirst === null ? null : tFirst - t0, stopped: true};
    } else {
      div.classList.add("error");
      body.textContent = text + (text ? "\n" : "") + "error: " + e.message;
      text = "";  // a failed answer is shown, not kept
      status.textContent = "";
    }
  } finally {
    controller = null;
    if (!message.stats && text) {
      const tps = tokens > 1 && tLast > tFirst ? (tokens - 1) / ((tLast - tFirst) / 1000) : null;
      message.stats = {tokens, tps, ttft_ms: tFirst - t0};
    }
    if (text) {
      message.content = text;
      conv.messages.push(message);
      conv.updated = Date.now();
      persist();
      showStats(div, message.stats);
    }
    busy(false);
  }
}

// -- images -------------------------------------------------------------------------------------------------------
function readImage(file) {
  return new Promise((resolve, reject) => {
    if (!file.type.startsWith("image/")) {
      return reject(new Error(`${file.name} is not an image (${file.type || "unknown type"})`));
    }
    if (file.size > MAX_IMAGE_BYTES) return reject(new Error(`${file.name} is over ${MAX_IMAGE_BYTES / 2 ** 20} MiB`));
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`${file.name} could not be read`));
    reader.readAsDataURL(file);
  });
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  attachments.forEach((url, k) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = "image to send";
    const drop = document.createElement("button");
    drop.type = "button";
    drop.textContent = "×";
    drop.title = "Remove this image";
    drop.addEventListener("click", () => { attachments.splice(k, 1); renderAttachments(); });
    fig.append(img, drop);
    box.append(fig);
  });
}

$("attach").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", async () => {
  for (const file of $("file").files) {
    try { attachments.push(await readImage(file)); } catch (e) { status.textContent = e.message; }
  }
  $("file").value = "";
  renderAttachments();
});

// -- actions ------------------------------------------------------------------------------------------------------
$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if ((!text && !attachments.length) || controller) return;
  const content = attachments.length ?
    [{type: "text", text}, ...attachments.map((url) => ({type: "image_url", image_url: {url}}))] : text;
  input.value = "";
  attachments = [];
  renderAttachments();
  const conv = conversation() || startConversation(text);
  const message = {role: "user", content};
  conv.messages.push(message);
  persist();
  renderConversations();
  bubble(message);
  reply();
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("regen").addEventListener("click", () => {
  const msgs = messages();
  if (controller || !msgs.length) return;
  while (msgs.length && msgs[msgs.length - 1].role === "assistant") msgs.pop();
  if (!msgs.length) return;
  persist();
  render();
  reply();
});
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  store.current = null;
  persist();
  render();
});
$("apikey").addEventListener("change", loadModel);
loadModel();
render();
