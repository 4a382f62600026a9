// Live view: GET /v1/stats every second while the view is open; counters become rates here.
import { el, getJSON, svg } from "./api.js";

const $ = (id) => document.getElementById(id);
const PERIOD_MS = 1000;
const history = [];          // tokens/s, the last minute
let timer = null, last = null;

function card(id, label, value, detail = "") {
  return el("div", { class: "card", id: `lv-${id}` },
    el("div", { class: "label", text: label }),
    el("div", { class: "value", "data-value": typeof value === "number" ? value : null, text: String(value) }),
    el("div", { class: "detail", text: detail }));
}

function spark() {
  const W = 600, H = 60, top = Math.max(1, ...history);
  const pts = history.map((v, i) => `${(W * i) / 59},${H - 2 - ((H - 4) * v) / top}`).join(" ");
  return svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "spark" },
    svg("polyline", { points: pts || `0,${H - 2}` }),
    svg("text", { x: 4, y: 12 }, `max ${top.toFixed(1)}`));
}

async function tick() {
  try {
    const s = await getJSON("/v1/stats");
    let rate = 0;
    if (last) rate = Math.max(0, (s.streamed_tokens - last.streamed_tokens) / Math.max(1e-3, s.time - last.time));
    last = s;
    history.push(rate);
    if (history.length > 60) history.shift();
    const hit = s.prefix_cache_queried_tokens
      ? `${((100 * s.prefix_cache_hit_tokens) / s.prefix_cache_queried_tokens).toFixed(0)}% of ${s.prefix_cache_queried_tokens} prompt tokens` : "";
    $("lv-cards").replaceChildren(
      card("running", "running", s.num_running ?? "–"),
      card("waiting", "waiting", s.num_waiting ?? "–"),
      card("kv", "KV blocks used", s.num_kv_blocks_used ?? "–", s.num_kv_blocks ? `of ${s.num_kv_blocks}` : ""),
      card("rate", "tokens/s", Number(rate.toFixed(1)), `${s.streamed_tokens} tokens since start`),
      card("prefix", "prefix-cache hit tokens", s.prefix_cache_hit_tokens ?? "–", hit),
      card("failed", "checks failed", s.checks_failed, `of ${s.checks_run} run; ${s.guard_blocked} blocked`),
      card("forced", "forced tokens", s.num_forced_tokens ?? "–"),
      card("finished", "requests finished", s.requests_finished, `weights version ${s.weights_version ?? "–"}`));
    $("lv-spark").replaceChildren(spark());
    $("lv-status").textContent = `updated ${new Date(s.time * 1000).toLocaleTimeString()}${s.ready ? "" : " (not ready)"}`;
  } catch (e) {
    $("lv-status").textContent = e.message;
  }
}

export function startLive() {
  if (timer) return;
  tick();
  timer = setInterval(tick, PERIOD_MS);
}

export function stopLive() {
  clearInterval(timer);
  timer = null;
  last = null;
}
