// The page: a form that posts AUTOMATIC1111's txt2img body to /sdapi/v1/txt2img (img2img's to /sdapi/v1/img2img
// when a picture is chosen, with its mask if one is chosen too; a ControlNet unit when a control picture is chosen),
// a progress bar fed by polling /sdapi/v1/progress?id_task=<this request's id> (Interrupt: POST
// /imagine/v1/cancel?id_task=<it>, which stops this page's job and no one else's), and a gallery of the results.
// One request body goes both ways: formBody reads the form into it (Generate), bodyToForm puts one back (a card's
// Reuse, and a picture's parameters, A1111's PNG Info, read into a body by pictureBody: chosen under "Parameters from
// a picture" or dropped anywhere on the page). The Parameters box shows the chosen card's infotext (the newest
// batch's first image, as A1111 shows it), and the seed's recycle button puts that card's seed back.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("form");
const gallery = $("gallery");
const MAX_SEED = 2 ** 32 - 1;
const FILES = ["init_image", "mask", "control_image"];  // the pictures a request may carry
const SAMPLER_OPTIONS = [["eta", "Eta"], ["s_churn", "Sigma churn"], ["s_tmin", "Sigma tmin"], ["s_tmax", "Sigma tmax"],
                         ["s_noise", "Sigma noise"]];  // A1111's body fields, their infotext labels
const HIRES_FIELDS = ["enable_hr", "hr_scale", "hr_resize_x", "hr_resize_y", "hr_second_pass_steps", "hr_upscaler",
                      "hr_prompt", "hr_negative_prompt", "hr_sampler_name", "hr_scheduler"];
let busy = false;
let starting = false;  // Generate was clicked and the request is being made (busy follows): a second click waits
let generation = 0;  // the current generation's number: a poll loop of an older one stops when it sees it changed
let job = null;  // the current generation's {n, id, seen, state: starting|queued|running|ending, stopping}
let pollTimer = null;
let serverOptions = {};  // GET /sdapi/v1/options
const automaticPick = {};  // sampler -> the schedule type (label) A1111's "Automatic" picks for it, where it names one
const defaults = {};  // the form's first values, the server's settings in: a picture's reading starts from them
let limits = {};  // the server's limits (/imagine/v1/config)
let variationsOnly = false;  // the model makes variations of a picture alone (an unCLIP decoder): OpenAI's endpoint
let selected = null;  // the gallery card whose infotext the Parameters box shows
let reading = 0;  // the latest picture read for its parameters (an older reading that answers late is dropped)

// the tab's icon, inline (no /favicon.ico request; added here, as index.html's links are all the server's own paths)
document.head.append(Object.assign(document.createElement("link"), {
  rel: "icon",
  href: "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Crect width='16' " +
        "height='16' rx='4' fill='%233056d3'/%3E%3Ccircle cx='8' cy='8' r='4' fill='%2312b5cb'/%3E%3C/svg%3E",
}));

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function showNotice(message) {
  const box = $("notice");
  box.textContent = message;
  box.hidden = !message;
}

function taskId() {
  const a = new Uint8Array(8);
  crypto.getRandomValues(a);
  return "page-" + Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
}

// the form's own fields (not the file pickers, not the buttons)
function formFields() {
  return [...form.elements].filter((e) => e.id && e.type !== "file" && !["BUTTON", "FIELDSET", "OUTPUT"].includes(e.tagName));
}

function fieldValue(e) { return e.type === "checkbox" ? e.checked : e.value; }

function resetForm() {
  for (const e of formFields()) {
    if (!(e.id in defaults)) continue;
    if (e.type === "checkbox") e.checked = defaults[e.id];
    else e.value = defaults[e.id];
  }
}

// the value of select `id`'s option that is `v`, case aside; null where there is none
function optionValue(id, v) {
  if (v === undefined || v === null) return null;
  const want = String(v).trim().toLowerCase();
  const option = [...$(id).options].find((o) => o.value.toLowerCase() === want);
  return option ? option.value : null;
}

function setOptions(id, values, first = []) {
  const keep = $(id).value;
  $(id).replaceChildren(...first.map((n) => new Option(n, n)), ...values.map((n) => new Option(n, n)));
  $(id).value = optionValue(id, keep) || $(id).options[0].value;
}

async function loadConfig() {
  try {
    const r = await fetch("/imagine/v1/config");
    const c = await r.json();
    if (!r.ok) throw new Error(c.detail || "HTTP " + r.status);
    const several = await loadCheckpoints(c.model);
    $("model").textContent = (several ? "" : c.model + "  ·  ") + "imagine " + c.version;
    const d = c.defaults, lim = c.limits;
    limits = lim;
    variationsOnly = !!c.variations_only;
    if (variationsOnly) {
      $("img2img").open = true;
      showNotice("This model makes variations of a picture: choose it under \u201cStart from a picture\u201d.");
    }
    infotextDefaults = c.infotext_defaults || {};
    $("steps").value = d.steps; $("steps").max = lim.max_steps;
    $("hr_second_pass_steps").max = lim.max_steps;
    $("cfg_scale").value = d.guidance_scale;
    for (const k of ["width", "height"]) {
      $(k).value = d[k]; $(k).step = c.size_multiple; $(k).min = c.size_multiple;
      $(k).max = lim["max_" + k];
    }
    $("batch_size").max = lim.max_images;
    $("n_iter").max = lim.max_images;
    for (const k of ["prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"]) $(k).maxLength = lim.max_prompt_length;
    const sel = $("sampler");
    sel.replaceChildren(...c.samplers.map((n) => new Option(n, n, n === d.sampler, n === d.sampler)));
    // the hires pass's sampler: the first pass's unless one is picked (A1111's "Use same sampler")
    setOptions("hr_sampler", c.samplers, ["Use same sampler"]);
  } catch (e) {
    showError("Could not read the server's settings: " + e);
  }
  try {  // the schedule types the server runs (A1111's labels, imagine's own among them)
    const r = await fetch("/sdapi/v1/schedulers");
    if (r.ok) {
      const types = await r.json();
      const labelOf = Object.fromEntries(types.map((s) => [s.name, s.label]));
      const labels = [...new Set(types.map((s) => s.label).filter((l) => l && l !== "Automatic"))];
      // each sampler's "Automatic" pick (A1111's samplers list: options.scheduler), by its label
      const s = await fetch("/sdapi/v1/samplers");
      if (s.ok) {
        for (const x of await s.json()) {
          if (x.options && x.options.scheduler) automaticPick[x.name] = labelOf[x.options.scheduler];
        }
      }
      if (labels.length) {
        setOptions("scheduler", labels, ["Automatic"]);
        setOptions("hr_scheduler", labels, ["Use same scheduler", "Automatic"]);
      }
    }
  } catch (e) { /* the page's own list stays */ }
  try {  // the server's noise settings: the Noise section starts from them (the page sends them with each request)
    const r = await fetch("/sdapi/v1/options");
    if (r.ok) {
      serverOptions = await r.json();
      const o = serverOptions;
      // (A1111's "GPU", the server's default, is torch's generator on the server's device: its CPU, as the server reads it)
      $("randn_source").value = o.randn_source === "NV" ? "NV" : "CPU";
      $("eta_noise_seed_delta").value = Number.isInteger(o.eta_noise_seed_delta) ? o.eta_noise_seed_delta : 0;
      $("zero_terminal_snr").checked = o.sd_noise_schedule === "Zero Terminal SNR";
      $("downcast_alphas_cumprod").checked = o.use_downcasted_alpha_bar === true;
      $("old_prompt_editing").checked = o.use_old_scheduling === true;
      $("pad_conds").value = o.pad_cond_uncond_v0 === true ? "v0" : o.pad_cond_uncond === true ? "empty" : "";
    }
  } catch (e) { /* the page's own defaults stay */ }
  try {  // the upscalers the server runs (A1111's /sdapi/v1/upscalers): its models for the hires. fix and for Extras
    const r = await fetch("/sdapi/v1/upscalers");
    if (r.ok) {
      const names = (await r.json()).map((u) => u.name).filter((n) => n && n !== "None");
      const have = new Set([...$("hr_upscaler").options].map((o) => o.value));
      $("hr_upscaler").append(...names.filter((n) => !have.has(n)).map((n) => new Option(n, n)));
      const models = names.filter((n) => n !== "Lanczos" && n !== "Nearest");
      $("extras_upscaler").replaceChildren(...[...models, "Lanczos", "Nearest"].map((n, i) => new Option(n, n, i === 0,
                                                                                                          i === 0)));
    }
  } catch (e) { /* the page's own list stays */ }
  try {  // the ControlNets the server loaded (A1111's ControlNet extension's list): the section shows when there are any
    const r = await fetch("/controlnet/model_list");
    const names = r.ok ? (await r.json()).model_list || [] : [];
    $("controlnet_model").replaceChildren(...names.map((n) => new Option(n, n)));
    $("controlnet").hidden = names.length === 0;
    const m = await fetch("/controlnet/module_list?alias_names=true");  // the preprocessors the server runs
    const modules = m.ok ? (await m.json()).module_list || ["none"] : ["none"];
    $("control_module").replaceChildren(...modules.map((n) => new Option(n, n)));
  } catch (e) {
    $("controlnet").hidden = true;
  }
  for (const e of formFields()) defaults[e.id] = fieldValue(e);
  $("controlnet").dataset.ready = "1";  // (the lists are read: the page's tests wait for it)
  document.body.dataset.ready = "1";
}

// the server's checkpoints (imagine serve --ckpt-dir; A1111's checkpoint picker): shown when there are
// several; whether it is
async function loadCheckpoints(current) {
  try {
    const r = await fetch("/sdapi/v1/sd-models");
    const titles = r.ok ? (await r.json()).map((m) => m.title) : [];
    $("checkpoint").replaceChildren(...titles.map((t) => new Option(t, t)));
    $("checkpoint").value = current;
    $("checkpoint").hidden = titles.length < 2 || !titles.includes(current);
  } catch (e) {
    $("checkpoint").hidden = true;
  }
  return !$("checkpoint").hidden;
}

// another checkpoint picked: the server loads it (A1111's way, POST /sdapi/v1/options), then the page reads
// its settings
async function changeCheckpoint() {
  const title = $("checkpoint").value;
  $("checkpoint").disabled = true;
  $("model").textContent = "loading " + title + "\u2026";
  showError("");
  try {
    const r = await fetch("/sdapi/v1/options", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sd_model_checkpoint: title }),
    });
    if (!r.ok) showError((await r.json().catch(() => ({}))).detail || "HTTP " + r.status);
  } catch (e) {
    showError("Could not change the checkpoint: " + e);
  }
  await loadConfig();
  $("checkpoint").disabled = false;
}
$("checkpoint").addEventListener("change", changeCheckpoint);

// -- the form's checks: the browser's own are off (novalidate), these say what is wrong ---------------------------
class FieldError extends Error {
  constructor(field, message) { super(message); this.field = field; }
}

// field `id` as a number: empty, not a number, not whole where it must be, or out of range: a FieldError
function num(id, label, { integer = false, min = -Infinity, max = Infinity, above = null, optional = false } = {}) {
  const raw = $(id).value.trim();
  if (raw === "") {  // (a number field holds "" for what is not a number, too)
    if (optional) return null;
    throw new FieldError(id, label + " is empty or not a number: give " + (integer ? "a whole number." : "a number."));
  }
  const v = Number(raw);
  if (!Number.isFinite(v)) throw new FieldError(id, label + " must be a number; got " + raw + ".");
  if (integer && !Number.isInteger(v)) throw new FieldError(id, label + " must be a whole number; got " + raw + ".");
  const low = above !== null ? v <= above : v < min;
  if (low || v > max) {
    const from = above !== null ? "more than " + above : "at least " + min;
    throw new FieldError(id, label + " must be " + (max < Infinity ? from + " and at most " + max : from) +
                             "; got " + raw + ".");
  }
  return v;
}

function chosenFiles() {
  const out = {};
  for (const id of FILES) if ($(id).files[0] && !(id === "control_image" && $("controlnet").hidden)) out[id] = $(id).files[0];
  return out;
}

// the form as A1111's request body (its pictures left out: requestFor adds them), the endpoint, and the pictures
function formBody() {
  const prompt = $("prompt").value.trim();
  if (!prompt && !variationsOnly) throw new FieldError("prompt", "Write a prompt first.");  // (a variation needs none)
  const body = {
    prompt, negative_prompt: $("negative_prompt").value.trim(),
    steps: num("steps", "Steps", { integer: true, min: 1 }),
    cfg_scale: num("cfg_scale", "Guidance (CFG)", { min: 0 }),
    width: num("width", "Width", { integer: true, min: 1 }),
    height: num("height", "Height", { integer: true, min: 1 }),
    sampler_name: $("sampler").value, scheduler: $("scheduler").value,
    seed: num("seed", "Seed", { integer: true, min: -1, max: MAX_SEED }),
    batch_size: num("batch_size", "Batch size", { integer: true, min: 1 }),
    n_iter: num("n_iter", "Batch count", { integer: true, min: 1 }),
  };
  if (limits.max_images && body.batch_size * body.n_iter > limits.max_images) {  // (the server's limit on a request)
    throw new FieldError(body.n_iter > 1 ? "n_iter" : "batch_size", "Batch count × batch size is " +
                         body.batch_size * body.n_iter + " images; the server makes at most " + limits.max_images +
                         " a request.");
  }
  for (const [id, label] of SAMPLER_OPTIONS) {  // (empty: the sampler's own)
    const v = num(id, label, { min: 0, optional: true });
    if (v !== null) body[id] = v;
  }
  // A1111's variation seed: another seed's start noise mixed in at that strength; its "resize seed from"
  const variation = num("subseed_strength", "Variation strength", { min: 0, max: 1 });
  if (variation > 0) {
    body.subseed = num("subseed", "Variation seed", { integer: true, min: -1, max: MAX_SEED });
    body.subseed_strength = variation;
  }
  const rw = num("seed_resize_from_w", "Resize seed from width", { integer: true, min: -1 });
  const rh = num("seed_resize_from_h", "Resize seed from height", { integer: true, min: -1 });
  if (rw > 0 && rh > 0) Object.assign(body, { seed_resize_from_w: rw, seed_resize_from_h: rh });
  else if (rw > 0 || rh > 0) {
    throw new FieldError(rw > 0 ? "seed_resize_from_h" : "seed_resize_from_w",
                         "Resize seed from needs a width and a height (both 0: off).");
  }
  // A1111's noise settings, for this request only (its override_settings)
  body.override_settings = {
    randn_source: $("randn_source").value,
    eta_noise_seed_delta: num("eta_noise_seed_delta", "Eta noise seed delta", { integer: true, min: 0 }),
    sd_noise_schedule: $("zero_terminal_snr").checked ? "Zero Terminal SNR" : "Default",
    use_downcasted_alpha_bar: $("downcast_alphas_cumprod").checked,
    use_old_scheduling: $("old_prompt_editing").checked,
    pad_cond_uncond: $("pad_conds").value === "empty",
    pad_cond_uncond_v0: $("pad_conds").value === "v0",
  };
  const files = chosenFiles();
  let endpoint = "/sdapi/v1/txt2img";
  if (files.mask && !files.init_image) throw new FieldError("mask", "A mask needs a picture to start from.");
  if (files.init_image) {  // img2img: A1111's body, the picture resized by the server to the size (no hires. fix)
    body.denoising_strength = num("denoising_strength", "Denoising strength", { above: 0, max: 1 });
    body.resize_mode = Number($("resize_mode").value);  // (A1111's 0-3: imagine.images.RESIZE_MODES)
    endpoint = "/sdapi/v1/img2img";
  } else {
    const scale = num("hr_scale", "Upscale scale", { min: 1, max: 4 });
    // (A1111's "Resize width to / height to": a size in place of the scale, either side 0 from the other)
    const resizeX = num("hr_resize_x", "Resize width to", { integer: true, min: 0 });
    const resizeY = num("hr_resize_y", "Resize height to", { integer: true, min: 0 });
    if (scale > 1 || resizeX > 0 || resizeY > 0) {  // A1111's hires. fix
      Object.assign(body, {
        enable_hr: true, hr_scale: scale, hr_resize_x: resizeX, hr_resize_y: resizeY,
        denoising_strength: num("hr_strength", "Upscale strength", { above: 0, max: 1 }),
        hr_second_pass_steps: num("hr_second_pass_steps", "Upscale steps", { integer: true, min: 0 }),
        hr_upscaler: $("hr_upscaler").value,
        hr_prompt: $("hr_prompt").value.trim(), hr_negative_prompt: $("hr_negative_prompt").value.trim(),
        hr_sampler_name: $("hr_sampler").value, hr_scheduler: $("hr_scheduler").value,
      });
    }
  }
  if (files.control_image) {  // one unit of A1111's ControlNet extension ("none": the picture is the map)
    const weight = num("control_weight", "ControlNet weight", { min: 0, max: 2 });
    body.alwayson_scripts = { controlnet: { args: [{
      enabled: true, image: null, model: $("controlnet_model").value, weight, module: $("control_module").value,
    }] } };
  }
  return { body, endpoint, files };
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// the body as sent: the pictures as data URLs, the task id the progress follows
async function requestFor(body, files, id) {
  const sent = JSON.parse(JSON.stringify(body));
  sent.force_task_id = id;
  if (files.init_image) sent.init_images = [await readAsDataURL(files.init_image)];
  if (files.mask) sent.mask = await readAsDataURL(files.mask);
  if (files.control_image) sent.alwayson_scripts.controlnet.args[0].image = await readAsDataURL(files.control_image);
  return sent;
}

// -- a body back into the form: a card's Reuse, a picture's parameters -------------------------------------------
function setFile(id, file) {
  const t = new DataTransfer();
  if (file) t.items.add(file);
  $(id).files = t.files;
}

function updateFileButtons() {
  for (const id of FILES) $(id + "_clear").hidden = !$(id).files.length;
  // hires. fix runs from text only: with a picture to start from, the Upscale section is not applied
  $("hires_ignored").hidden = !($("init_image").files.length && (Number($("hr_scale").value) > 1 ||
                                Number($("hr_resize_x").value) > 0 || Number($("hr_resize_y").value) > 0));
}

// open the folded sections whose settings are not the defaults (a reader sees what applies)
function openChangedSections() {
  for (const d of form.querySelectorAll("details")) {
    if (d.id === "pnginfo" || d.hidden) continue;
    const changed = [...d.querySelectorAll("input, select, textarea")].some((e) =>
      e.type === "file" ? e.files.length > 0 : e.id in defaults && fieldValue(e) !== defaults[e.id]);
    if (changed) d.open = true;
  }
}

function hiresUpscaler(name) {  // an A1111 upscaler name as the server takes it: one it runs, else its nearest kind
  // (the page's list: the upscalers the server runs, its /sdapi/v1/latent-upscale-modes and /sdapi/v1/upscalers)
  const runs = [...$("hr_upscaler").options].map((o) => o.value);
  const known = runs.find((n) => n.toLowerCase() === String(name || "").trim().toLowerCase());
  return known || (!name || /^latent/i.test(String(name)) ? "Latent" : "Lanczos");
}

function bodyToForm(b, files = {}) {
  resetForm();
  const set = (id, v) => { if (v !== undefined && v !== null && v !== "") $(id).value = v; };
  const choose = (id, v) => { const o = optionValue(id, v); if (o !== null) $(id).value = o; };
  $("prompt").value = b.prompt || "";
  $("negative_prompt").value = b.negative_prompt || "";
  for (const k of ["steps", "cfg_scale", "width", "height", "seed", "batch_size", "n_iter"]) set(k, b[k]);
  choose("sampler", b.sampler_name);
  choose("scheduler", b.scheduler || "Automatic");
  for (const [id] of SAMPLER_OPTIONS) set(id, b[id]);
  if (b.subseed_strength > 0) { set("subseed", b.subseed); set("subseed_strength", b.subseed_strength); }
  if (b.seed_resize_from_w > 0 && b.seed_resize_from_h > 0) {
    set("seed_resize_from_w", b.seed_resize_from_w); set("seed_resize_from_h", b.seed_resize_from_h);
  }
  const o = b.override_settings || {};
  if ("randn_source" in o) $("randn_source").value = o.randn_source === "NV" ? "NV" : "CPU";
  if ("eta_noise_seed_delta" in o) set("eta_noise_seed_delta", o.eta_noise_seed_delta);
  if ("sd_noise_schedule" in o) $("zero_terminal_snr").checked = o.sd_noise_schedule === "Zero Terminal SNR";
  if ("use_downcasted_alpha_bar" in o) $("downcast_alphas_cumprod").checked = o.use_downcasted_alpha_bar === true;
  if ("use_old_scheduling" in o) $("old_prompt_editing").checked = o.use_old_scheduling === true;
  if ("pad_cond_uncond" in o || "pad_cond_uncond_v0" in o) {
    $("pad_conds").value = o.pad_cond_uncond_v0 === true ? "v0" : o.pad_cond_uncond === true ? "empty" : "";
  }
  if (b.enable_hr && !files.init_image) {
    set("hr_scale", b.hr_scale);
    set("hr_resize_x", b.hr_resize_x || 0);
    set("hr_resize_y", b.hr_resize_y || 0);
    set("hr_strength", b.denoising_strength ?? 0.7);  // (A1111's hires strength when none is sent)
    set("hr_second_pass_steps", b.hr_second_pass_steps);
    $("hr_upscaler").value = hiresUpscaler(b.hr_upscaler);
    $("hr_prompt").value = b.hr_prompt || "";
    $("hr_negative_prompt").value = b.hr_negative_prompt || "";
    choose("hr_sampler", b.hr_sampler_name || "Use same sampler");
    choose("hr_scheduler", b.hr_scheduler || "Use same scheduler");
  } else {
    set("denoising_strength", b.denoising_strength);  // (image to image's)
    $("resize_mode").value = String(b.resize_mode ?? 0);
  }
  const unit = (((b.alwayson_scripts || {}).controlnet || {}).args || [])[0];
  if (unit) {
    choose("controlnet_model", unit.model); choose("control_module", unit.module); set("control_weight", unit.weight);
  }
  for (const id of FILES) setFile(id, files[id] || null);
  updateFileButtons();
  openChangedSections();
}

// -- progress, interrupt --------------------------------------------------------------------------------------
function updateInterrupt() {
  const b = $("interrupt");
  const state = busy && job && !job.stopping ? job.state : null;
  b.disabled = state !== "queued" && state !== "running";  // (only this page's own job, once the server has it)
  b.textContent = state === "queued" ? "Cancel" : "Interrupt";
  b.title = state === "queued" ? "take this page's job out of the server's queue"
                               : "stop this page's job at its next step (the images so far are shown)";
}

function setBusy(on) {
  busy = on;
  $("generate").disabled = on;
  $("generate").textContent = on ? "Generating…" : "Generate";
  $("progress").hidden = !on;
  if (!on) {
    clearTimeout(pollTimer);
    pollTimer = null;
  }
  updateInterrupt();
}

function showProgress(p, id) {
  const running = String((p.state && p.state.job) || "").split(",").includes(id);
  const waiting = typeof p.textinfo === "string" && p.textinfo.startsWith("waiting");
  if (running || waiting) job.seen = true;
  job.state = running ? "running" : waiting ? "queued" : job.seen ? "ending" : "starting";
  updateInterrupt();
  let text;
  if (!job.seen) text = "queued…";  // (the request is on its way: the server does not know the task yet)
  else if (running) {
    text = p.textinfo || "starting…";
    $("progress-fill").style.width = (100 * (p.progress || 0)).toFixed(1) + "%";
    if (p.progress > 0 && p.eta_relative > 0) text += " · about " + p.eta_relative.toFixed(1) + " s left";
    if (p.current_image) {
      $("preview").src = "data:image/png;base64," + p.current_image;
      $("preview").hidden = false;
    }
  } else text = p.textinfo || "finishing…";
  if (job.stopping) text = "stopping… · " + text;
  $("progress-text").textContent = text;
}

async function poll(n, id) {
  if (n !== generation || !busy) return;
  try {
    const r = await fetch("/sdapi/v1/progress?id_task=" + encodeURIComponent(id));
    const p = r.ok ? await r.json() : null;
    if (n !== generation || !busy) return;  // (a newer generation polls its own task now)
    if (p) { job.failures = 0; showProgress(p, id); }
  } catch (e) {  // (the next poll tries again)
    if (n === generation && busy && ++job.failures >= 3) {
      $("progress-text").textContent = "the server does not answer (" + e.message + "); still trying…";
    }
  }
  if (n === generation && busy) pollTimer = setTimeout(() => poll(n, id), 400);
}

async function stopJob() {
  const j = job;
  if (!busy || !j || j.stopping || (j.state !== "queued" && j.state !== "running")) return;
  j.stopping = true;
  updateInterrupt();
  $("progress-text").textContent = j.state === "queued" ? "cancelling…" : "interrupting…";
  try {  // (this task only: POST /sdapi/v1/interrupt would stop whatever runs, someone else's job too)
    const r = await fetch("/imagine/v1/cancel?id_task=" + encodeURIComponent(j.id), { method: "POST" });
    if (!r.ok) j.stopping = false;  // (it ended meanwhile)
  } catch (e) {
    j.stopping = false;
  }
  updateInterrupt();
}

// -- the gallery ----------------------------------------------------------------------------------------------
// the Parameters box shows this card's infotext (A1111's "generation info" of the selected image); the recycle
// button takes its seed
function selectCard(node) {
  if (selected) selected.classList.remove("selected");
  selected = node && node.isConnected ? node : null;
  if (selected) selected.classList.add("selected");
  const text = selected ? selected.dataset.infotext || "" : "";
  $("infotext").textContent = text;
  $("info").hidden = !text;
  $("reuse-seed").disabled = !selected;
}

function makeCard(b64, params, made) {
  const node = $("card-template").content.firstElementChild.cloneNode(true);
  const src = "data:image/png;base64," + b64;
  const img = node.querySelector(".image");
  img.src = src;
  img.alt = params.prompt;
  img.style.aspectRatio = params.width + " / " + params.height;
  node.querySelector(".prompt").textContent = params.prompt;
  const rows = [["Seed", made.seed], ["Steps", params.steps], ["Sampler", params.sampler_name],
                ["CFG", params.cfg_scale], ["Size", params.width + "×" + params.height]];
  if (params.scheduler && params.scheduler !== "Automatic") rows.push(["Schedule", params.scheduler]);
  if (params.enable_hr) {
    const to = params.hr_resize_x || params.hr_resize_y ? "to " + params.hr_resize_x + "×" + params.hr_resize_y
      : "×" + params.hr_scale;
    rows.push(["Upscale", to + ", strength " + params.denoising_strength]);
  }
  if (params.subseed_strength > 0) rows.push(["Variation", made.subseed + " at " + params.subseed_strength]);
  if (params.n_iter > 1 || params.batch_size > 1) rows.push(["Batch", params.n_iter + " × " + params.batch_size]);
  if (params.negative_prompt) rows.push(["Negative", params.negative_prompt]);
  if (made.interrupted) rows.push(["Note", "interrupted"]);
  const dl = node.querySelector(".params");
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    dl.append(dt, dd);
  }
  const a = node.querySelector(".download");
  a.href = src;
  a.download = "imagine-" + made.seed + ".png";
  node.querySelector(".reuse").addEventListener("click", () => {
    // the request that made the card, with this image's seed (and variation seed) in place of a random one
    const again = { ...made.body, seed: made.seed };
    if (made.body.subseed_strength > 0 && Number.isInteger(made.subseed)) again.subseed = made.subseed;
    showError(""); showNotice("");
    bodyToForm(again, made.files);
    window.scrollTo({ top: 0, behavior: "smooth" });
  });
  if (made.interrupted) node.classList.add("interrupted");
  // (with a variation strength a batch's images share the seed, as A1111's: the subseed tells them apart)
  node.dataset.seed = made.seed;
  if (made.body.subseed_strength > 0 && Number.isInteger(made.subseed)) node.dataset.subseed = made.subseed;
  node.dataset.infotext = made.infotext || "";
  img.addEventListener("click", () => selectCard(node));
  return node;
}

// a request's images at the top of the gallery, in their order (seed, seed + 1, ...), the first one selected
function addCards(nodes) {
  if (!nodes.length) return;
  gallery.prepend(...nodes);
  $("empty").hidden = true;
  $("clear").hidden = false;
  selectCard(nodes[0]);
}

// a server's refusal names its field (422's `field`): that field is shown, as the page's own checks show theirs
const SERVER_FIELDS = { sampler_name: "sampler", hr_sampler_name: "hr_sampler", init_images: "init_image" };
function showServerField(field, endpoint) {
  if (!field) return;
  let id = SERVER_FIELDS[field] || field;
  if (field === "denoising_strength") id = endpoint.endsWith("img2img") ? "denoising_strength" : "hr_strength";
  const el = $(id);
  if (!el || !form.contains(el)) return;
  const section = el.closest("details");
  if (section) section.open = true;
  el.focus();
}

function fieldProblem(e) {
  showError(e.message);
  const el = $(e.field);
  const section = el && el.closest("details");
  if (section) section.open = true;  // (a field in a folded section: shown)
  if (el) el.focus();
}

async function generate(ev) {
  if (ev) ev.preventDefault();
  if (busy || starting) return;
  starting = true;
  try {
    await ready;  // (the server's lists and defaults in the form first)
    await run();
  } finally {
    starting = false;
  }
}

async function run() {
  showError(""); showNotice("");
  let request;
  try {
    request = formBody();
  } catch (e) {
    if (e instanceof FieldError) { fieldProblem(e); return; }
    throw e;
  }
  const { body, endpoint, files } = request;
  if (variationsOnly) return runVariations(body, files);
  const id = taskId();
  let sent;
  try {
    sent = await requestFor(body, files, id);
  } catch (e) {
    showError("Could not read the chosen picture: " + e);
    return;
  }
  const n = ++generation;
  job = { n, id, seen: false, state: "starting", stopping: false, failures: 0 };
  setBusy(true);
  $("progress-fill").style.width = "0%";
  $("progress-text").textContent = "queued…";
  $("preview").hidden = true;
  poll(n, id);
  try {
    const r = await fetch(endpoint, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(sent),
    });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) {
      if (r.status === 499 && job.stopping) {
        showNotice("Cancelled: the job was stopped before it finished; nothing was made.");
        return;
      }
      let msg = typeof data.detail === "string" && data.detail ? data.detail
        : data.detail ? JSON.stringify(data.detail) : "The server answered HTTP " + r.status + ".";
      if (r.status === 429) msg = "The server is busy. Try again in " + (r.headers.get("Retry-After") || "a few") + " s.";
      showError(msg);
      showServerField(data.field, endpoint);
      return;
    }
    const info = JSON.parse(data.info);
    const params = { ...body, ...data.parameters };
    addCards(data.images.map((b64, i) => makeCard(b64, params, {
      body, files, seed: info.all_seeds[i], subseed: (info.all_subseeds || [])[i], interrupted: info.interrupted,
      infotext: (info.infotexts || [])[i],
    })));
    if ((info.infotexts || [])[0]) lastInfotext = info.infotexts[0];
    if (info.interrupted && !data.images.length) showError("Interrupted before any image was started.");
  } catch (e) {
    showError("Request failed: " + e);
  } finally {
    setBusy(false);
  }
}

// Extras: the chosen picture enlarged by an upscaler (A1111's /sdapi/v1/extra-single-image), a card of its own
async function runExtras() {
  showError(""); showNotice("");
  const file = $("extras_image").files[0];
  if (!file) { fieldProblem(new FieldError("extras_image", "Choose the picture to upscale.")); return; }
  const scale = Number($("extras_scale").value);
  if (!(scale > 0 && scale <= 8)) {
    fieldProblem(new FieldError("extras_scale", "The scale must be more than 0 and at most 8."));
    return;
  }
  const upscaler = $("extras_upscaler").value;
  $("extras_run").disabled = true;
  try {
    const body = { image: await readAsDataURL(file), resize_mode: 0, upscaling_resize: scale, upscaler_1: upscaler };
    const r = await fetch("/sdapi/v1/extra-single-image", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) {
      showError(typeof data.detail === "string" && data.detail ? data.detail : "The server answered HTTP " + r.status + ".");
      return;
    }
    const img = new Image();
    img.src = "data:image/png;base64," + data.image;
    await img.decode();
    const node = $("card-template").content.firstElementChild.cloneNode(true);
    const shown = node.querySelector(".image");
    shown.src = img.src;
    shown.alt = file.name + " upscaled";
    shown.style.aspectRatio = img.naturalWidth + " / " + img.naturalHeight;
    node.querySelector(".prompt").textContent = file.name;
    const dl = node.querySelector(".params");
    for (const [k, v] of [["Upscaler", upscaler], ["Scale", "×" + scale], ["Size", img.naturalWidth + "×" + img.naturalHeight]]) {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      dl.append(dt, dd);
    }
    const a = node.querySelector(".download");
    a.href = img.src;
    a.download = file.name.replace(/\.[^.]*$/, "") + "-upscaled.png";
    node.querySelector(".reuse").hidden = true;  // (no generation settings to put back)
    node.dataset.infotext = data.html_info || "";
    shown.addEventListener("click", () => selectCard(node));
    node.classList.add("upscaled");
    addCards([node]);
  } catch (e) {
    showError("Upscale failed: " + e);
  } finally {
    $("extras_run").disabled = false;
  }
}

// an unCLIP decoder's variations of the chosen picture (OpenAI's images.create_variation, as the server takes it)
async function runVariations(body, files) {
  if (!files.init_image) {
    fieldProblem(new FieldError("init_image", "This model makes variations of a picture: choose the picture."));
    return;
  }
  const form = new FormData();
  form.append("image", files.init_image);
  form.append("n", String(body.batch_size * body.n_iter));
  form.append("response_format", "b64_json");
  for (const [k, v] of [["seed", body.seed], ["steps", body.steps], ["guidance_scale", body.cfg_scale],
                        ["sampler", body.sampler_name], ["prompt", body.prompt]]) {
    if (v !== "" && v !== undefined) form.append(k, String(v));
  }
  ++generation;
  setBusy(true);
  $("progress-fill").style.width = "0%";
  $("progress-text").textContent = "making variations…";
  try {
    const r = await fetch("/v1/images/variations", { method: "POST", body: form });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) {
      showError((data.error && data.error.message) || "The server answered HTTP " + r.status + ".");
      return;
    }
    const [width, height] = String(data.size || "").split("x").map(Number);
    const params = { ...body, width: width || body.width, height: height || body.height };
    addCards(data.data.map((d) => makeCard(d.b64_json, params, { body, files, seed: d.seed })));
  } catch (e) {
    showError("Request failed: " + e);
  } finally {
    setBusy(false);
  }
}

// -- A1111's PNG Info: a picture's parameters (its infotext, read by the server's /sdapi/v1/png-info) -----------
// the fields A1111's reader fills in where an infotext has none (the server's imagine.images.A1111_INFOTEXT_DEFAULTS,
// from /imagine/v1/config): at these values they ask for nothing
let infotextDefaults = {};
// the fields the page reads into the form, and those that say how a picture was made but ask for nothing
const READ_FIELDS = new Set([
  "Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size-1", "Size-2", "Eta",
  "Eta DDIM", "Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise", "Variation seed", "Variation seed strength",
  "Seed resize from-1", "Seed resize from-2", "RNG", "ENSD", "Noise Schedule", "Downcast alphas_cumprod",
  "Old prompt editing timelines", "Pad conds", "Pad conds v0", "Denoising strength", "Hires upscale", "Hires resize-1", "Hires resize-2", "Hires steps", "Hires upscaler",
  "Hires sampler", "Hires schedule type", "Hires prompt", "Hires negative prompt",
]);
const RECORD_FIELDS = new Set(["Model", "Model hash", "Version", "VAE hash", "Lora hashes", "TI hashes", "Hashes",
                               "Batch size", "Batch pos"]);

function isTrue(v) { return v === true || String(v).toLowerCase() === "true"; }

// a number from an infotext's text; undefined where it has none
function infoNumber(v) {
  if (v === undefined || v === null || String(v).trim() === "") return undefined;
  return Number(v);
}

// A1111 before 1.9 wrote the schedule type into the sampler's name ("DPM++ 2M Karras"): [sampler, schedule type]
function splitSampler(selectId, name) {
  if (!name || optionValue(selectId, name)) return [optionValue(selectId, name) || name, null];
  const labels = [...$("scheduler").options].map((o) => o.value).filter((v) => v !== "Automatic")
    .sort((a, b) => b.length - a.length);
  for (const label of labels) {
    const tail = " " + label.toLowerCase();
    if (String(name).toLowerCase().endsWith(tail)) {
      const base = optionValue(selectId, String(name).slice(0, -tail.length).trim());
      if (base) return [base, label];
    }
  }
  return [name, null];
}

// an infotext's fields (as /sdapi/v1/png-info reads them) -> {body: A1111's request body for the same picture,
// notApplied: the picture's settings the page cannot apply, problems: what stops it making the picture}
function pictureBody(p) {
  const body = { prompt: p["Prompt"] || "", negative_prompt: p["Negative prompt"] || "" };
  const notApplied = [], problems = [];
  const put = (key, label) => {
    const v = infoNumber(p[label]);
    if (v === undefined) return;
    if (Number.isFinite(v)) body[key] = v;
    else notApplied.push(label + ": " + p[label] + " (not a number)");
  };
  put("steps", "Steps"); put("cfg_scale", "CFG scale"); put("seed", "Seed");
  put("width", "Size-1"); put("height", "Size-2");
  const [sampler, impliedSchedule] = splitSampler("sampler", p["Sampler"]);
  if (p["Sampler"] && !optionValue("sampler", sampler)) {
    problems.push("This server has no sampler " + p["Sampler"] + "; the form has the server's default, " +
                  defaults.sampler + ".");
  } else if (p["Sampler"]) body.sampler_name = sampler;
  let schedule = p["Schedule type"];
  if ((!schedule || /^automatic$/i.test(schedule)) && impliedSchedule) schedule = impliedSchedule;
  // (A1111's reader: the schedule type "Automatic" picks for the sampler is read as Automatic, so that a hires pass on
  // "Use same scheduler" takes its own sampler's, as it did; its get_sampler_and_scheduler's convert_automatic)
  const pick = automaticPick[body.sampler_name || sampler];
  if (schedule && pick && schedule.toLowerCase() === pick.toLowerCase()) schedule = "Automatic";
  if (schedule && !optionValue("scheduler", schedule)) {
    notApplied.push("Schedule type: " + schedule + " (this server has no such schedule type: Automatic is used)");
  } else if (schedule) body.scheduler = optionValue("scheduler", schedule);
  put("eta", p["Eta"] !== undefined ? "Eta" : "Eta DDIM");
  for (const [key, label] of SAMPLER_OPTIONS.slice(1)) put(key, label);
  const variation = infoNumber(p["Variation seed strength"]);
  if (variation > 0) { body.subseed_strength = variation; put("subseed", "Variation seed"); }
  put("seed_resize_from_w", "Seed resize from-1"); put("seed_resize_from_h", "Seed resize from-2");
  // (no RNG written: A1111's default GPU source, an NVIDIA card's draws for most pictures: NV)
  // (A1111's reader turns Downcast alphas_cumprod on for its older versions' pictures: the API answers true; imagine
  // reproduces it for the samplers that step in noise levels, so an old DDIM, PLMS, UniPC or LCM picture runs without)
  const ownTimesteps = ["DDIM", "PLMS", "UniPC", "LCM", "DDIM CFG++"].includes(body.sampler_name);
  body.override_settings = {
    randn_source: p["RNG"] === "CPU" ? "CPU" : "NV",
    eta_noise_seed_delta: Number.isInteger(infoNumber(p["ENSD"])) ? infoNumber(p["ENSD"]) : 0,
    sd_noise_schedule: p["Noise Schedule"] === "Zero Terminal SNR" ? "Zero Terminal SNR" : "Default",
    use_downcasted_alpha_bar: !ownTimesteps && isTrue(p["Downcast alphas_cumprod"]),
    use_old_scheduling: isTrue(p["Old prompt editing timelines"]),
    pad_cond_uncond: isTrue(p["Pad conds"]),
    pad_cond_uncond_v0: isTrue(p["Pad conds v0"]),
  };
  if (infoNumber(p["Hires upscale"]) > 1 || infoNumber(p["Hires resize-1"]) > 0 || infoNumber(p["Hires resize-2"]) > 0) {
    body.enable_hr = true;
    put("hr_scale", "Hires upscale");
    put("hr_resize_x", "Hires resize-1");
    put("hr_resize_y", "Hires resize-2");
    put("denoising_strength", "Denoising strength");
    put("hr_second_pass_steps", "Hires steps");
    body.hr_upscaler = hiresUpscaler(p["Hires upscaler"]);
    if (p["Hires upscaler"] && p["Hires upscaler"] !== body.hr_upscaler) {
      notApplied.push("Hires upscaler: " + p["Hires upscaler"] + " (run here as " + body.hr_upscaler + ", the server's " +
                      (body.hr_upscaler.startsWith("Latent") ? "latent upscale)" : "image upscaler)"));
    }
    body.hr_prompt = p["Hires prompt"] || "";
    body.hr_negative_prompt = p["Hires negative prompt"] || "";
    let hiresSchedule = p["Hires schedule type"] || "Use same scheduler";
    const named = p["Hires sampler"] && !/^use same sampler$/i.test(p["Hires sampler"]);
    if (named) {
      const [hiresSampler, implied] = splitSampler("hr_sampler", p["Hires sampler"]);
      if (!optionValue("hr_sampler", hiresSampler)) problems.push("This server has no sampler " + p["Hires sampler"] + ".");
      else body.hr_sampler_name = hiresSampler;
      // (an old picture's "Hires sampler: Euler a" beside "Sampler: DPM++ 2M Karras": Euler a's own schedule)
      if (/^use same scheduler$/i.test(hiresSchedule) && (implied || impliedSchedule)) hiresSchedule = implied || "Automatic";
    }
    if (!optionValue("hr_scheduler", hiresSchedule)) {
      notApplied.push("Hires schedule type: " + hiresSchedule + " (this server has no such schedule type)");
    } else body.hr_scheduler = optionValue("hr_scheduler", hiresSchedule);
  } else if (infoNumber(p["Denoising strength"]) !== undefined) {
    put("denoising_strength", "Denoising strength");
    notApplied.push("Denoising strength: " + p["Denoising strength"] + " (an image-to-image picture's: set under " +
                    "Start from a picture; choose the picture it started from there)");
  }
  for (const [k, v] of Object.entries(p)) {
    if (READ_FIELDS.has(k) || RECORD_FIELDS.has(k)) continue;
    if (k in infotextDefaults && String(v).toLowerCase() === String(infotextDefaults[k]).toLowerCase()) continue;
    if (k === "Clip skip" && String(v) === String(serverOptions.CLIP_stop_at_last_layers ?? 1)) continue;
    if (k === "VAE" && v === serverOptions.sd_vae) continue;
    const text = String(v);
    notApplied.push(k + ": " + (text.length > 80 ? text.slice(0, 77) + "…" : text));
  }
  return { body, notApplied, problems };
}

function showPictureNotice(items, removed) {
  const box = $("pnginfo_notice");
  box.replaceChildren();
  if (removed.length) {
    const p = document.createElement("p");
    p.textContent = "Removed the chosen " + removed.join(", ") + " (the picture's parameters are applied alone).";
    box.append(p);
  }
  if (items.length) {
    const p = document.createElement("p");
    p.textContent = "Not applied by this page (the picture it makes may differ):";
    const ul = document.createElement("ul");
    ul.id = "pnginfo_not_applied";
    for (const item of items) {
      const li = document.createElement("li");
      li.textContent = item;
      ul.append(li);
    }
    box.append(p, ul);
  }
  box.hidden = !box.childElementCount;
}

const ready = loadConfig();

async function readPicture() {
  const file = $("pnginfo_image").files[0];
  if (!file) return;
  const mine = ++reading;
  await ready;
  showError("");
  showPictureNotice([], []);
  try {
    const r = await fetch("/sdapi/v1/png-info", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image: await readAsDataURL(file) }),
    });
    const data = await r.json().catch(() => ({}));
    if (mine !== reading) return;  // (another picture was chosen meanwhile)
    if (!r.ok) { showError(data.detail || ("The server answered HTTP " + r.status + ".")); return; }
    if (!data.info) {
      $("pnginfo_text").hidden = true;
      showError("This picture carries no parameters (an A1111 or imagine PNG, JPEG or WebP does).");
      return;
    }
    applyInfotext(data.info, data.parameters);
  } catch (e) {
    showError("Could not read the picture: " + e);
  }
}

// an infotext read by the server (its text, and its fields as /sdapi/v1/png-info gives them) into the form
function applyInfotext(info, parameters) {
  $("pnginfo_text").textContent = info;
  $("pnginfo_text").hidden = !info;
  const { body, notApplied, problems } = pictureBody(parameters);
  const names = { init_image: "picture to start from", mask: "mask", control_image: "control picture" };
  const removed = FILES.filter((id) => $(id).files.length).map((id) => names[id]);
  bodyToForm(body);  // (every field the infotext lacks back at its default; the chosen pictures removed)
  showPictureNotice(notApplied, removed);
  if (notApplied.length || removed.length) $("pnginfo").open = true;  // (where the notice shows)
  if (problems.length) showError(problems.join(" "));
}

// A1111's paste button (↙): an infotext pasted into the prompt box (from a PNG Info tab or a model's page) is read
// into the form; with the prompt box empty, the last picture this page made is read again, as A1111 reads its last
// generation. Plain prompt text (no "Steps: ..., Sampler: ..." line) changes nothing.
let lastInfotext = "";
async function readPromptParameters() {
  const text = $("prompt").value.trim() || lastInfotext;
  const mine = ++reading;
  await ready;
  showError("");
  if (!text) {
    showError("Paste an infotext (a prompt with its \"Steps: ..., Sampler: ...\" line) into the prompt box first.");
    return;
  }
  try {
    const r = await fetch("/imagine/v1/infotext", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text }),
    });
    const data = await r.json().catch(() => ({}));
    if (mine !== reading) return;
    if (!r.ok) { showError(data.detail || ("The server answered HTTP " + r.status + ".")); return; }
    if (!data.has_settings) {
      showError("The prompt box holds no parameters line (\"Steps: 20, Sampler: ..., CFG scale: ...\" after the " +
                "prompt): nothing was changed.");
      return;
    }
    showPictureNotice([], []);
    applyInfotext(data.info, data.parameters);
  } catch (e) {
    showError("Could not read the parameters: " + e);
  }
}
$("read_prompt").addEventListener("click", readPromptParameters);

$("pnginfo_image").addEventListener("change", readPicture);
// (the same picture chosen again is read again: the form may have changed since)
$("pnginfo_image").addEventListener("click", () => { $("pnginfo_image").value = ""; });

// a picture dropped anywhere on the page (but on a file picker, which takes it as its own) is read for its
// parameters, as A1111's PNG Info and ComfyUI's canvas take a dropped picture; without this the browser would leave
// the page to show the file
function carriesFiles(e) { return !!e.dataTransfer && [...e.dataTransfer.types].includes("Files"); }
function onPicker(e) { return e.target instanceof HTMLInputElement && e.target.type === "file"; }
document.addEventListener("dragover", (e) => {
  if (!carriesFiles(e)) return;
  e.preventDefault();
  e.dataTransfer.dropEffect = "copy";
  document.body.classList.toggle("dropping", !onPicker(e));
});
document.addEventListener("dragleave", (e) => {
  if (!e.relatedTarget) document.body.classList.remove("dropping");
});
document.addEventListener("drop", (e) => {
  document.body.classList.remove("dropping");
  if (!carriesFiles(e)) return;
  e.preventDefault();
  const files = [...e.dataTransfer.files];
  if (onPicker(e)) {  // (a picker with its own drop: the picture is its own, as when chosen)
    if (files.length) {
      setFile(e.target.id, files[0]);
      e.target.dispatchEvent(new Event("change", { bubbles: true }));
    }
    return;
  }
  const file = files.find((f) => /^image\//.test(f.type) || /\.(png|jpe?g|webp)$/i.test(f.name));
  if (!file) {
    showError("Drop a picture (PNG, JPEG or WebP) to read the parameters it was made with.");
    return;
  }
  setFile("pnginfo_image", file);
  $("pnginfo").open = true;
  readPicture();
});
form.addEventListener("submit", generate);
$("extras_run").addEventListener("click", runExtras);
form.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(e);
});
$("random-seed").addEventListener("click", () => { $("seed").value = -1; });
$("reuse-seed").addEventListener("click", () => {  // (A1111's recycle button: the chosen image's seed)
  if (selected && selected.dataset.seed) $("seed").value = selected.dataset.seed;
});
$("copy-info").addEventListener("click", async () => {
  const text = $("infotext").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copy-info").textContent = "Copied";
  } catch (e) {  // (no clipboard without a secure context: the text is selected to copy by hand)
    const range = document.createRange();
    range.selectNodeContents($("infotext"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    $("copy-info").textContent = "Selected: Ctrl+C";
  }
  setTimeout(() => { $("copy-info").textContent = "Copy"; }, 1500);
});
$("interrupt").addEventListener("click", stopJob);
for (const id of FILES) {
  $(id).addEventListener("change", updateFileButtons);
  $(id + "_clear").addEventListener("click", () => { setFile(id, null); updateFileButtons(); });
}
for (const id of ["hr_scale", "hr_resize_x", "hr_resize_y"]) $(id).addEventListener("input", updateFileButtons);
$("clear").addEventListener("click", () => {
  gallery.replaceChildren();
  selectCard(null);
  $("empty").hidden = false;
  $("clear").hidden = true;
});
