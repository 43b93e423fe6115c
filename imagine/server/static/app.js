// The page: a form that posts AUTOMATIC1111's txt2img body to /sdapi/v1/txt2img (img2img's to /sdapi/v1/img2img
// when a picture is chosen, with its mask if one is chosen too; a ControlNet unit when a control picture is chosen),
// a progress bar
// fed by polling /sdapi/v1/progress?id_task=<this request's id>, and a gallery of the results.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("form");
const gallery = $("gallery");
let busy = false;
let pollTimer = null;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function taskId() {
  const a = new Uint8Array(8);
  crypto.getRandomValues(a);
  return "page-" + Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function loadConfig() {
  try {
    const r = await fetch("/imagine/v1/config");
    const c = await r.json();
    $("model").textContent = c.model + "  ·  imagine " + c.version;
    const d = c.defaults, lim = c.limits;
    $("steps").value = d.steps; $("steps").max = lim.max_steps;
    $("cfg_scale").value = d.guidance_scale;
    for (const k of ["width", "height"]) {
      $(k).value = d[k]; $(k).step = c.size_multiple; $(k).min = c.size_multiple;
      $(k).max = lim["max_" + k];
    }
    $("batch_size").max = lim.max_images;
    $("prompt").maxLength = lim.max_prompt_length;
    $("negative_prompt").maxLength = lim.max_prompt_length;
    const sel = $("sampler");
    sel.replaceChildren(...c.samplers.map((n) => new Option(n, n, n === d.sampler, n === d.sampler)));
    // the hires pass's sampler: the first pass's unless one is picked (A1111's "Use same sampler")
    $("hr_sampler").replaceChildren(new Option("Use same sampler", "Use same sampler", true, true),
                                    ...c.samplers.map((n) => new Option(n, n)));
  } catch (e) {
    showError("Could not read the server's settings: " + e);
  }
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
  $("controlnet").dataset.ready = "1";  // (the list is read: the page's tests wait for it)
}

function setBusy(on) {
  busy = on;
  $("generate").disabled = on;
  $("generate").textContent = on ? "Generating…" : "Generate";
  $("interrupt").disabled = !on;
  $("progress").hidden = !on;
  if (!on) {
    clearTimeout(pollTimer);
    pollTimer = null;
  }
}

async function poll(id) {
  if (!busy) return;
  try {
    const r = await fetch("/sdapi/v1/progress?id_task=" + encodeURIComponent(id));
    if (r.ok) {
      const p = await r.json();
      $("progress-fill").style.width = (100 * (p.progress || 0)).toFixed(1) + "%";
      let text = p.textinfo || "starting…";
      if (p.progress > 0 && p.eta_relative > 0) text += " · about " + p.eta_relative.toFixed(1) + " s left";
      $("progress-text").textContent = text;
      if (p.current_image) {
        $("preview").src = "data:image/png;base64," + p.current_image;
        $("preview").hidden = false;
      }
    }
  } catch (e) { /* the next poll tries again */ }
  if (busy) pollTimer = setTimeout(() => poll(id), 400);
}

function intValue(id) { return parseInt($(id).value, 10); }

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function addCard(b64, params, seed, interrupted) {
  const node = $("card-template").content.firstElementChild.cloneNode(true);
  const src = "data:image/png;base64," + b64;
  const img = node.querySelector(".image");
  img.src = src;
  img.alt = params.prompt;
  img.style.aspectRatio = params.width + " / " + params.height;
  node.querySelector(".prompt").textContent = params.prompt;
  const rows = [["Seed", seed], ["Steps", params.steps], ["Sampler", params.sampler_name],
                ["CFG", params.cfg_scale], ["Size", params.width + "×" + params.height]];
  if (params.negative_prompt) rows.push(["Negative", params.negative_prompt]);
  if (interrupted) rows.push(["Note", "interrupted"]);
  const dl = node.querySelector(".params");
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    dl.append(dt, dd);
  }
  const a = node.querySelector(".download");
  a.href = src;
  a.download = "imagine-" + seed + ".png";
  node.querySelector(".reuse").addEventListener("click", () => {
    $("prompt").value = params.prompt;
    $("negative_prompt").value = params.negative_prompt || "";
    $("steps").value = params.steps; $("cfg_scale").value = params.cfg_scale;
    $("width").value = params.width; $("height").value = params.height;
    $("sampler").value = params.sampler_name; $("seed").value = seed;
    $("scheduler").value = params.scheduler || "Automatic";
    window.scrollTo({ top: 0, behavior: "smooth" });
  });
  if (interrupted) node.classList.add("interrupted");
  node.dataset.seed = seed;
  gallery.prepend(node);
  $("empty").hidden = true;
  $("clear").hidden = false;
}

async function generate(ev) {
  if (ev) ev.preventDefault();
  if (busy) return;
  showError("");
  const prompt = $("prompt").value.trim();
  if (!prompt) { showError("Write a prompt first."); $("prompt").focus(); return; }
  const id = taskId();
  const body = {
    prompt, negative_prompt: $("negative_prompt").value.trim(),
    steps: intValue("steps"), cfg_scale: parseFloat($("cfg_scale").value),
    width: intValue("width"), height: intValue("height"),
    sampler_name: $("sampler").value, scheduler: $("scheduler").value, seed: intValue("seed"),
    batch_size: intValue("batch_size"), n_iter: 1, force_task_id: id,
  };
  for (const k of ["steps", "width", "height", "seed", "batch_size"]) {
    if (Number.isNaN(body[k])) { showError(k + " must be a whole number"); return; }
  }
  // A1111's variation seed: another seed's start noise mixed in at that strength
  const variation = parseFloat($("subseed_strength").value);
  if (variation > 0) { body.subseed = intValue("subseed"); body.subseed_strength = variation; }
  // A1111's noise settings, for this request only (its override_settings)
  const ensd = intValue("eta_noise_seed_delta");
  if (Number.isNaN(ensd) || ensd < 0) { showError("eta noise seed delta must be a whole number, 0 or more"); return; }
  body.override_settings = { randn_source: $("randn_source").value, eta_noise_seed_delta: ensd,
                             sd_noise_schedule: $("zero_terminal_snr").checked ? "Zero Terminal SNR" : "Default",
                             use_downcasted_alpha_bar: $("downcast_alphas_cumprod").checked,
                             use_old_scheduling: $("old_prompt_editing").checked };
  // img2img when a picture is chosen: A1111's body, the picture as a data URL, resized by the server to the size
  const file = $("init_image").files[0];
  const mask = $("mask").files[0];  // inpainting: A1111's mask (its other inpainting fields take their defaults)
  let endpoint = "/sdapi/v1/txt2img";
  if (mask && !file) { showError("A mask needs a picture to start from."); return; }
  if (file) {
    body.init_images = [await readAsDataURL(file)];
    body.denoising_strength = parseFloat($("denoising_strength").value);
    if (mask) body.mask = await readAsDataURL(mask);
    endpoint = "/sdapi/v1/img2img";
  } else if (parseFloat($("hr_scale").value) > 1) {  // A1111's hires. fix (text to image only)
    body.enable_hr = true;
    body.hr_scale = parseFloat($("hr_scale").value);
    body.denoising_strength = parseFloat($("hr_strength").value);
    body.hr_sampler_name = $("hr_sampler").value;
    body.hr_scheduler = $("hr_scheduler").value;
  }
  // a control picture: one unit of A1111's ControlNet extension (its preprocessor, "none": the picture is the map)
  const control = $("control_image").files[0];
  if (control) {
    const weight = parseFloat($("control_weight").value);
    if (!Number.isFinite(weight)) { showError("the ControlNet weight must be a number"); return; }
    body.alwayson_scripts = { controlnet: { args: [{
      enabled: true, image: await readAsDataURL(control), model: $("controlnet_model").value, weight,
      module: $("control_module").value,
    }] } };
  }
  setBusy(true);
  $("progress-fill").style.width = "0%";
  $("progress-text").textContent = "queued…";
  $("preview").hidden = true;
  poll(id);
  try {
    const r = await fetch(endpoint, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) {
      let msg = data.detail || ("HTTP " + r.status);
      if (r.status === 429) msg = "The server is busy. Try again in " + (r.headers.get("Retry-After") || "a few") + " s.";
      showError(msg);
      return;
    }
    const info = JSON.parse(data.info);
    const params = { ...body, ...data.parameters };
    data.images.forEach((b64, i) => addCard(b64, params, info.all_seeds[i], info.interrupted));
    if (info.interrupted && !data.images.length) showError("Interrupted before any image was started.");
  } catch (e) {
    showError("Request failed: " + e);
  } finally {
    setBusy(false);
  }
}

// A1111's PNG Info: a picture's parameters (its infotext, read by the server's /sdapi/v1/png-info) into the form
async function readPicture() {
  const file = $("pnginfo_image").files[0];
  if (!file) return;
  showError("");
  try {
    const r = await fetch("/sdapi/v1/png-info", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image: await readAsDataURL(file) }),
    });
    const data = await r.json();
    if (!r.ok) { showError(data.detail || ("HTTP " + r.status)); return; }
    $("pnginfo_text").textContent = data.info;
    $("pnginfo_text").hidden = !data.info;
    if (!data.info) { showError("This picture carries no parameters (an A1111 or imagine PNG does)."); return; }
    const p = data.parameters;
    const set = (id, v) => { if (v !== undefined && v !== null && v !== "") $(id).value = v; };
    $("prompt").value = p["Prompt"] || "";
    $("negative_prompt").value = p["Negative prompt"] || "";
    set("steps", p["Steps"]); set("cfg_scale", p["CFG scale"]); set("seed", p["Seed"]);
    set("width", p["Size-1"]); set("height", p["Size-2"]);
    const has = (id, v) => [...$(id).options].some((o) => o.value === v);
    if (p["Sampler"] && !has("sampler", p["Sampler"])) showError("This server has no sampler " + p["Sampler"] + ".");
    else set("sampler", p["Sampler"]);
    $("scheduler").value = has("scheduler", p["Schedule type"]) ? p["Schedule type"] : "Automatic";
    const hires = parseFloat(p["Hires upscale"] || "0") > 1;
    $("hr_scale").value = hires ? p["Hires upscale"] : 1;
    if (hires) { set("hr_strength", p["Denoising strength"]); $("hires").open = true; }
    // (A1111 writes its hires sampler and schedule type only where they differ from the first pass's)
    const hiresSampler = p["Hires sampler"] || "Use same sampler";
    if (!has("hr_sampler", hiresSampler)) showError("This server has no sampler " + hiresSampler + ".");
    $("hr_sampler").value = has("hr_sampler", hiresSampler) ? hiresSampler : "Use same sampler";
    const hiresSchedule = p["Hires schedule type"] || "Use same scheduler";
    $("hr_scheduler").value = has("hr_scheduler", hiresSchedule) ? hiresSchedule : "Use same scheduler";
    const variation = parseFloat(p["Variation seed strength"] || "0");
    $("subseed_strength").value = variation;
    if (variation > 0) { set("subseed", p["Variation seed"]); $("variation").open = true; }
    // (no RNG written: A1111's default GPU source, an NVIDIA card's draws for most pictures: NV)
    $("randn_source").value = p["RNG"] === "CPU" ? "CPU" : "NV";
    $("eta_noise_seed_delta").value = p["ENSD"] || 0;
    $("zero_terminal_snr").checked = p["Noise Schedule"] === "Zero Terminal SNR";
    // (A1111's reader turns it on for its older versions' pictures: the API answers true; imagine reproduces it for
    // the samplers that step in noise levels, so an old DDIM, PLMS, UniPC or LCM picture runs without it)
    const ownTimesteps = ["DDIM", "PLMS", "UniPC", "LCM", "DDIM CFG++"].includes(p["Sampler"]);
    $("downcast_alphas_cumprod").checked = !ownTimesteps &&
      (p["Downcast alphas_cumprod"] === true || p["Downcast alphas_cumprod"] === "True");
    $("old_prompt_editing").checked = p["Old prompt editing timelines"] === true || p["Old prompt editing timelines"] === "True";
    $("noise").open = true;
  } catch (e) {
    showError("Could not read the picture: " + e);
  }
}

$("pnginfo_image").addEventListener("change", readPicture);
form.addEventListener("submit", generate);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(e);
});
$("random-seed").addEventListener("click", () => { $("seed").value = -1; });
$("interrupt").addEventListener("click", () => fetch("/sdapi/v1/interrupt", { method: "POST" }));
$("clear").addEventListener("click", () => {
  gallery.replaceChildren();
  $("empty").hidden = false;
  $("clear").hidden = true;
});
loadConfig();
