// The console's shell: the key field, the three views and the #hash that picks one
// (#playground, #trace/<id>, #live).
import { setKey } from "./api.js";
import { initPlayground, loadModels } from "./playground.js";
import { startLive, stopLive } from "./live.js";
import { initTrace, showTrace } from "./trace.js";

function route() {
  const [view, ...rest] = (location.hash.slice(1) || "playground").split("/");
  const name = ["playground", "trace", "live"].includes(view) ? view : "playground";
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== `view-${name}`;
  }
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.view === name);
  }
  if (name === "live") startLive(); else stopLive();
  if (name === "trace") showTrace(decodeURIComponent(rest.join("/")));
}

const key = document.getElementById("api-key");
key.addEventListener("input", () => setKey(key.value));
key.addEventListener("change", () => { setKey(key.value); loadModels(); });
initPlayground();
initTrace();
window.addEventListener("hashchange", route);
loadModels();
route();
