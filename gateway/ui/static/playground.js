// Playground: build a chat request from the form, stream it, and show what a client sees:
// text as it arrives, tool calls as they form, guard flags where they occur, and a block as
// the client gets it (the withheld text never reaches the page, so it cannot be in the DOM).
import { ApiError, el, getJSON, stream } from "./api.js";

const $ = (id) => document.getElementById(id);
let running = null;          // the AbortController of the stream in flight

function parseJSON(text) {
  try { return { value: JSON.parse(text) }; } catch (e) { return { error: e.message }; }
}

// The schema editor and the tools editor say at once whether their JSON is usable.
function checkSchema(form) {
  const out = $("pg-schema-status");
  const active = form.format.value === "json_schema";
  form.schema.hidden = !active;
  if (!active) { out.textContent = ""; out.className = "status"; return true; }
  const { value, error } = parseJSON(form.schema.value);
  const ok = !error && value && typeof value === "object" && !Array.isArray(value);
  out.textContent = ok ? "✓ valid JSON schema object" : `✗ ${error || "a schema is a JSON object"}`;
  out.className = ok ? "status ok" : "status bad";
  return ok;
}

function checkTools(form) {
  const out = $("pg-tools-status");
  const text = form.tools.value.trim();
  if (!text) { out.textContent = ""; out.className = "status"; return true; }
  const { value, error } = parseJSON(text);
  const ok = !error && Array.isArray(value) && value.every((t) => t?.function?.name);
  out.textContent = ok ? `✓ ${value.length} tool(s): ${value.map((t) => t.function.name).join(", ")}`
    : `✗ ${error || "an array of {type: 'function', function: {name, parameters}}"}`;
  out.className = ok ? "status ok" : "status bad";
  return ok;
}

function addMessage(role = "user", content = "") {
  const row = document.getElementById("message-row").content.firstElementChild.cloneNode(true);
  row.querySelector(".role").value = role;
  row.querySelector(".content").value = content;
  row.querySelector(".remove").addEventListener("click", () => row.remove());
  $("pg-messages").append(row);
}

function number(input) { return input.value === "" ? undefined : Number(input.value); }

export function buildRequest(form) {
  const messages = [...document.querySelectorAll("#pg-messages .message")].map((row) => ({
    role: row.querySelector(".role").value, content: row.querySelector(".content").value }));
  const body = { model: form.model.value, messages, stream_options: { include_usage: true } };
  for (const name of ["temperature", "top_p", "top_k", "max_tokens", "seed"]) {
    const v = number(form[name]);
    if (v !== undefined) body[name] = v;
  }
  const stop = form.stop.value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stop.length) body.stop = stop;
  if (form.format.value === "json_object") body.response_format = { type: "json_object" };
  if (form.format.value === "json_schema") {
    body.response_format = { type: "json_schema",
      json_schema: { name: "console", schema: JSON.parse(form.schema.value) } };
  }
  if (form.tools.value.trim()) {
    body.tools = JSON.parse(form.tools.value);
    body.tool_choice = form.tool_choice.value;
  }
  const guard = {};
  if (form.guard_mode.value) guard.mode = form.guard_mode.value;
  if (form.guard_release.value) guard.release = form.guard_release.value;
  const checks = {};
  const deny = form.deny.value.split("\n").map((s) => s.trim()).filter(Boolean);
  if (deny.length) checks.deny = deny;
  for (const name of ["schema", "tool_args", "truncation", "arithmetic"]) {
    if (form[`check_${name}`].checked) checks[name] = true;
  }
  if (Object.keys(checks).length) guard.checks = checks;
  if (Object.keys(guard).length) body.plumbline = { guard };
  return body;
}

function flag(v) {
  const where = v.start !== undefined ? ` at ${v.start}–${v.end}` : "";
  return el("mark", { class: `flag ${v.check}`, title: `${v.message || v.check}${where}`,
    text: `⚑ ${v.check}` });
}

// A flag goes right after the text it flags (its `end` offset in the content) when that text
// is on the page already, else where the stream stands.
function placeFlag(answer, v) {
  let left = v.end;
  if (left !== undefined) {
    for (const node of answer.childNodes) {
      if (node.nodeType !== Node.TEXT_NODE) continue;
      if (left <= node.length) {
        const rest = left < node.length ? node.splitText(left) : node.nextSibling;
        answer.insertBefore(flag(v), rest);
        return;
      }
      left -= node.length;
    }
  }
  answer.append(flag(v));
}

function show(form) {
  const answer = $("pg-answer"), calls = $("pg-calls"), meta = $("pg-meta");
  const outcome = $("pg-outcome"), jsonStatus = $("pg-json");
  for (const node of [answer, calls, meta, outcome, jsonStatus]) node.replaceChildren();
  answer.className = "answer";
  const callNodes = new Map();
  const pendingFlags = [];
  const started = performance.now();
  let text = "", id = null, firstAt = null, lastAt = null, usage = null, finish = null;
  let verdict = null, incomplete = false;

  const onEvent = (chunk) => {
    if (!id && chunk.id) {
      id = chunk.id;
      meta.append(el("span", { text: id, class: "mono" }), " ",
        el("a", { href: `#trace/${encodeURIComponent(id)}`, id: "pg-trace-link", text: "trace →" }));
    }
    if (chunk.plumbline?.checks) verdict = chunk.plumbline.checks;
    if (chunk.usage) usage = chunk.usage;
    pendingFlags.push(...(chunk.plumbline?.violations || []));
    for (const choice of chunk.choices || []) {
      const delta = choice.delta || {};
      if (delta.content) {
        if (firstAt === null) {
          firstAt = performance.now();
          meta.dataset.ttftMs = (firstAt - started).toFixed(1);
        }
        lastAt = performance.now();
        text += delta.content;
        answer.append(document.createTextNode(delta.content));
      }
      for (const call of delta.tool_calls || []) {
        if (firstAt === null) firstAt = performance.now();
        let node = callNodes.get(call.index);
        if (!node) {
          node = { name: el("b"), args: el("code", { class: "args" }) };
          callNodes.set(call.index, node);
          calls.append(el("div", { class: "call", "data-index": call.index },
            el("span", { class: "label", text: "tool call " }), node.name, "(", node.args, ")"));
        }
        if (call.function?.name) node.name.textContent += call.function.name;
        if (call.function?.arguments) node.args.textContent += call.function.arguments;
      }
      if (choice.plumbline?.incomplete) incomplete = true;
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    for (const v of pendingFlags.splice(0)) placeFlag(answer, v);
  };

  const done = () => {
    const parts = [];
    if (finish) parts.push(el("span", { class: `finish ${finish}`, id: "pg-finish", text: `finish_reason: ${finish}` }));
    if (firstAt !== null) parts.push(el("span", { text: `first token ${(firstAt - started).toFixed(0)} ms` }));
    if (usage) {
      parts.push(el("span", { id: "pg-usage", "data-completion-tokens": usage.completion_tokens,
        text: `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` }));
      if (lastAt && firstAt && usage.completion_tokens > 1) {
        const rate = (usage.completion_tokens - 1) / ((lastAt - firstAt) / 1000);
        if (Number.isFinite(rate)) parts.push(el("span", { text: `${rate.toFixed(1)} tokens/s` }));
      }
    }
    if (incomplete) parts.push(el("span", { class: "bad", text: "incomplete: max_tokens cut the structure" }));
    if (verdict) {
      const state = verdict.blocked ? "blocked" : verdict.passed ? "passed" : "flagged";
      parts.push(el("span", { class: `verdict ${state}`, text: `guard: ${state} (${verdict.checks.join(", ")})` }));
    }
    outcome.append(...parts);
    if (finish === "content_filter") {
      answer.classList.add("blocked");
      const why = (verdict?.violations || []).map((v) => v.message || v.check).join("; ");
      answer.append(el("div", { class: "banner", id: "pg-blocked",
        text: `Blocked by the guard. The rest of this response was withheld${why ? `: ${why}` : ""}.` }));
    }
    if (form.format.value !== "text" && text) {
      const { value, error } = parseJSON(text);
      jsonStatus.append(error ? el("span", { class: "bad", text: `✗ not JSON: ${error}` })
        : el("span", { class: "ok", text: "✓ the answer parses as JSON" }));
      if (!error) jsonStatus.append(el("pre", { id: "pg-document", text: JSON.stringify(value, null, 2) }));
    }
  };
  return { onEvent, done };
}

async function send(form) {
  if (!checkSchema(form) || !checkTools(form)) return;
  const view = show(form);
  const controller = new AbortController();
  running = controller;
  $("pg-send").disabled = true;
  $("pg-stop").disabled = false;
  try {
    await stream("/v1/chat/completions", buildRequest(form), view.onEvent, controller.signal);
    view.done();
  } catch (e) {
    if (e.name === "AbortError") { view.done(); $("pg-outcome").append(el("span", { text: "stopped" })); }
    else {
      const param = e instanceof ApiError && e.body?.error?.param ? ` (${e.body.error.param})` : "";
      $("pg-outcome").append(el("span", { class: "bad", id: "pg-error",
        text: `${e instanceof ApiError ? `HTTP ${e.status}: ` : ""}${e.message}${param}` }));
    }
  } finally {
    running = null;
    $("pg-send").disabled = false;
    $("pg-stop").disabled = true;
  }
}

export async function loadModels() {
  try {
    const models = await getJSON("/v1/models");
    const list = $("pg-models");
    list.replaceChildren(...models.data.map((m) => el("option", { value: m.id })));
    const form = $("pg-form");
    if (!form.model.value && models.data.length) form.model.value = models.data[0].id;
  } catch { /* no key yet: the user types one, then we try again */ }
}

export function initPlayground() {
  const form = $("pg-form");
  addMessage("user", "Name three fruits.");
  $("pg-add-message").addEventListener("click", () => addMessage());
  form.format.addEventListener("change", () => checkSchema(form));
  form.schema.addEventListener("input", () => checkSchema(form));
  form.tools.addEventListener("input", () => checkTools(form));
  form.addEventListener("submit", (e) => { e.preventDefault(); send(form); });
  $("pg-stop").addEventListener("click", () => running?.abort());
}
