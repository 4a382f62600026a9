// The API as the console calls it: the key lives in this module's memory only (never in
// localStorage, sessionStorage or a cookie), and streams are read with fetch + ReadableStream,
// because EventSource cannot send an Authorization header.

let apiKey = "";

export function setKey(key) { apiKey = key.trim(); }

function headers(extra = {}) {
  const h = { ...extra };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function check(response) {
  if (response.ok) return response;
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  throw new ApiError(response.status, body);
}

export async function getJSON(path) {
  return (await check(await fetch(path, { headers: headers(), cache: "no-store" }))).json();
}

export async function postJSON(path, body, signal) {
  const response = await fetch(path, {
    method: "POST", body: JSON.stringify(body), signal,
    headers: headers({ "Content-Type": "application/json" }),
  });
  return (await check(response)).json();
}

// POST a streaming request; onEvent(json) for each `data:` frame until `[DONE]`.
export async function stream(path, body, onEvent, signal) {
  const response = await check(await fetch(path, {
    method: "POST", body: JSON.stringify({ ...body, stream: true }), signal,
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
  }));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;                // a comment (": ping") or an empty frame
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}

// Elements without innerHTML: text always goes in as text.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const SVG = "http://www.w3.org/2000/svg";
export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children.flat()) if (c) node.append(c);
  return node;
}
