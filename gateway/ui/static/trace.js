// Trace viewer: one request's tokens, logprobs, grammar masks, checks and timings, from
// GET /v1/traces/{id}/tokens (the trace's own access rules: the key that made the request
// sees its tokens, a withheld choice's tokens only the admin key).
import { ApiError, el, getJSON, postJSON, svg } from "./api.js";

const $ = (id) => document.getElementById(id);

// Processed logprob -> background: probability 1 green, 0 red.
function colour(logprob) {
  const p = Math.exp(logprob);
  return `hsl(${Math.round(120 * p)}, 70%, ${Math.round(88 - 10 * (1 - p))}%)`;
}

// Line breaks and tabs drawn, so every token keeps a visible cell of its own.
function visible(text) { return text.replace(/\n/g, "↵").replace(/\t/g, "⇥") || "∅"; }

function fmt(x, digits = 3) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

// Raw logprobs of a processed-mode trace: the model's own distribution, recomputed by scoring
// prompt + completion once through /v1/completions (echo + logprobs reports prompt tokens raw).
async function rawLogprobs(trace, choice) {
  if (trace.logprobs_mode === "raw") return { values: choice.logprobs, note: "recorded" };
  try {
    const out = await postJSON("/v1/completions", {
      model: trace.model || $("pg-form").model.value,
      prompt: [...trace.prompt_ids, ...choice.completion_ids],
      max_tokens: 1, echo: true, logprobs: 0, temperature: 0,
    });
    const all = out.choices[0].logprobs.token_logprobs;
    const start = trace.prompt_ids.length;
    return { values: all.slice(start, start + choice.completion_ids.length), note: "recomputed now" };
  } catch (e) {
    return { values: null, note: e instanceof ApiError ? `not available (${e.message})` : String(e) };
  }
}

function timeline(trace, choices) {
  const ts = trace.timestamps;
  const t0 = ts.queued, end = (ts.finished || Date.now() / 1000) - t0;
  const W = 720, H = 54, x = (t) => 10 + (W - 20) * Math.min(1, t / Math.max(end, 1e-6));
  const marks = [["queued", 0], ["admitted", ts.admitted], ["first token", ts.first_token],
    ["finished", ts.finished]].filter(([, t]) => t !== null && t !== undefined)
    .map(([name, t]) => [name, name === "queued" ? 0 : t - t0]);
  const ticks = [];
  for (const c of choices) {
    for (const [i, t] of (c.token_times || []).entries()) {
      ticks.push(svg("line", { x1: x(t), x2: x(t), y1: 30, y2: 44, class: "step" },
        svg("title", {}, `token ${i} at ${(t * 1000).toFixed(1)} ms`)));
    }
  }
  return el("div", { class: "panel" }, el("h3", { text: `timeline (${(end * 1000).toFixed(0)} ms)` }),
    svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "timeline", id: "tr-timeline" },
      svg("line", { x1: 10, x2: W - 10, y1: 37, y2: 37, class: "axis" }),
      ...ticks,
      ...marks.map(([name, t], k) => svg("g", { class: "mark" },
        svg("line", { x1: x(t), x2: x(t), y1: 10, y2: 48 }),
        // labels on the right half end at their mark, so the last one stays inside
        svg("text", { x: x(t) + (x(t) > W / 2 ? -3 : 3), y: 10 + 10 * (k % 2),
          "text-anchor": x(t) > W / 2 ? "end" : "start" }, `${name} ${(t * 1000).toFixed(0)} ms`)))));
}

function allowedChart(counts, vocab) {
  const W = 720, H = 80, n = counts.length, w = Math.max(1, (W - 20) / Math.max(n, 1));
  const top = Math.log2(Math.max(vocab || 1, ...counts) + 1);
  return el("div", { class: "panel" },
    el("h3", { text: "allowed tokens per constrained step (log scale; 1 = forced)" }),
    svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", id: "tr-allowed" },
      ...counts.map((c, i) => {
        const h = Math.max(2, (H - 10) * Math.log2(c + 1) / top);
        return svg("rect", { x: 10 + i * w, y: H - h, width: Math.max(1, w - 1), height: h,
          class: c === 1 ? "bar forced" : "bar" }, svg("title", {}, `step ${i}: ${c} allowed`));
      })));
}

// Token cells; characters [start, end) of a violation marked on the tokens that overlap them.
function tokenCells(view, choice, counts, raw, violations) {
  const closing = new Set(view.closing_steps);
  let offset = 0;
  return el("div", { class: "tokens", id: `tr-tokens-${choice.index}` },
    view.texts.map((text, i) => {
      const start = offset;
      offset += text.length;
      const hit = violations.filter((v) => v.start !== undefined && v.start < offset && v.end > start);
      const allowed = counts ? counts[i] : undefined;
      const classes = ["tok", allowed === 1 && "forced", closing.has(i) && "closing",
        hit.length && "violated"].filter(Boolean).join(" ");
      const title = [`#${i} id ${choice.completion_ids[i]}`,
        `processed logprob ${fmt(choice.logprobs[i], 4)}`,
        `raw logprob ${raw.values ? fmt(raw.values[i], 4) : raw.note}`,
        allowed !== undefined && `${allowed} token(s) allowed`,
        allowed === 1 && "forced: the grammar allowed this token alone",
        closing.has(i) && "budget-aware closing was due",
        ...hit.map((v) => `${v.check}: ${v.message || ""} [${v.start}, ${v.end})`),
      ].filter(Boolean).join("\n");
      return el("span", { class: classes, title, style: `background:${colour(choice.logprobs[i])}`,
        "data-raw": raw.values ? raw.values[i] : null, text: visible(text) });
    }));
}

function verdictList(verdict) {
  if (!verdict) return el("p", { class: "status", text: "no verdict (guard off or not finished)" });
  const state = verdict.blocked ? "blocked" : verdict.passed ? "passed" : "flagged";
  return el("div", { class: "verdicts" },
    el("p", {}, el("span", { class: `verdict ${state}`, text: state }), ` checks: ${verdict.checks.join(", ")}`),
    el("ul", {}, verdict.violations.map((v) => el("li", { class: "violation",
      text: `${v.check}: ${v.message || ""}${v.start !== undefined ? ` at [${v.start}, ${v.end})` : ""}` }))));
}

async function render(trace) {
  const body = $("tr-body");
  const grammar = trace.grammar;
  const versions = [...new Set(trace.choices.flatMap((c) => c.weights_versions || []))];
  const ms = (a, b) => (a && b ? `${((b - a) * 1000).toFixed(0)} ms` : "–");
  const ts = trace.timestamps;
  const summary = el("dl", { class: "panel summary" },
    ...[["id", trace.id], ["endpoint", trace.endpoint], ["logprobs", trace.logprobs_mode],
      ["weights version", versions.length ? versions.join(", ") : "–"],
      ["queued → admitted", ms(ts.queued, ts.admitted)],
      ["queued → first token", ms(ts.queued, ts.first_token)],
      ["total", ms(ts.queued, ts.finished)],
      ["grammar", grammar ? `${grammar.kind} (${grammar.backend}, compiled in ${fmt(grammar.compile_ms, 1)} ms)` : "none"],
      ["guard", trace.guard ? `${trace.guard.mode}, release ${trace.guard.release}` : "–"],
      ["max_tokens", trace.max_tokens ?? "–"],
    ].flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));
  const parts = [summary, timeline(trace, trace.choices)];
  for (const [i, choice] of trace.choices.entries()) {
    const view = trace.token_views[i];
    const verdict = trace.checks[i] || null;
    const section = el("div", { class: "panel choice" },
      el("h3", { text: `choice ${i}: ${choice.num_completion_tokens} tokens, finish_reason ${choice.finish_reason}` }));
    if (!view) {
      section.append(el("p", { class: "banner", id: `tr-withheld-${i}`,
        text: `Withheld: ${choice.num_completion_tokens} tokens the guard kept back. Only the admin key sees them.` }));
    } else {
      const counts = grammar?.allowed_token_counts?.[i] || null;
      const raw = await rawLogprobs(trace, choice);
      section.append(
        el("p", { class: "legend" }, "colour: processed probability; hover for raw logprob. ",
          el("span", { class: "tok forced", text: "forced" }), " ",
          el("span", { class: "tok closing", text: "closing" }), " ",
          el("span", { class: "tok violated", text: "check violation" }),
          ` raw logprobs ${raw.note}.`),
        tokenCells(view, choice, counts, raw, verdict?.violations || []));
      if (counts) section.append(allowedChart(counts, null));
    }
    section.append(verdictList(verdict));
    parts.push(section);
  }
  if (trace.events.length) {
    parts.push(el("div", { class: "panel" }, el("h3", { text: "check events" }),
      el("ul", {}, trace.events.map((e) => el("li", {
        text: `+${((e.t - ts.queued) * 1000).toFixed(0)} ms ${e.event} (choice ${e.index})${e.check ? ` ${e.check}` : ""}${e.start !== undefined ? ` [${e.start}, ${e.end})` : ""}` })))));
  }
  body.replaceChildren(...parts);
}

export async function showTrace(id) {
  const form = $("tr-form");
  form.id.value = id;
  const body = $("tr-body");
  if (!id) { body.replaceChildren(); return; }
  body.replaceChildren(el("p", { class: "status", text: "loading…" }));
  try {
    await render(await getJSON(`/v1/traces/${encodeURIComponent(id)}/tokens`));
  } catch (e) {
    body.replaceChildren(el("p", { class: "bad", id: "tr-error", text: e.message }));
  }
}

export function initTrace() {
  $("tr-form").addEventListener("submit", (e) => {
    e.preventDefault();
    location.hash = `#trace/${encodeURIComponent($("tr-form").id.value.trim())}`;
  });
}
