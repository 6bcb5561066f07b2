"""ComfyUI workflows (kolors_course.comfyui): the definitions name their sources, the
exported workflows validate and carry the story scene exactly, and the validator rejects
each kind of broken workflow with a message naming the problem."""
import copy
import json
import re

import pytest

from kolors_course.comfyui import (WorkflowError, check_workflow, controlnet_workflow, scene_workflow, to_ui,
                                   validate_workflow, write_workflows)
from kolors_course.comfyui.definitions import NODES_FILE, load_object_info, shipped_sources
from kolors_course.comfyui.uiformat import ui_to_api
from kolors_course.comfyui.workflows import (CHATGLM3_FILE, REFERENCE_IMAGE, SAMPLER_NAME, SCHEDULER, UNET_FILE,
                                             VAE_FILE, expected_files)
from kolors_course.story.stories import load_story

ARGS = dict(prompt="水墨画风格，一只白色的小狐狸", negative_prompt="丑陋、模糊", seed=101, steps=50, cfg=4.0,
            width=1024, height=768)
NEEDED = {"VAELoader", "LoraLoaderModelOnly", "KSampler", "EmptyLatentImage", "VAEDecode", "SaveImage", "LoadImage",
          "ControlNetApplyAdvanced", "ControlNetLoader", "Canny", "MZ_KolorsUNETLoaderV2", "MZ_ChatGLM3Loader",
          "MZ_ChatGLM3_V2", "MZ_KolorsControlNetLoader", "MZ_KolorsControlNetPatch"}


def node_of(workflow, class_type, title=None):
    """The id of the (first) node of a class (with that title)."""
    for node_id, node in workflow.items():
        if node["class_type"] == class_type and (title is None or node.get("_meta", {}).get("title") == title):
            return node_id
    raise AssertionError(f"no {class_type} node")


@pytest.fixture
def scene():
    return scene_workflow(**ARGS)


# -- the definitions --------------------------------------------------------------------

def test_definitions_name_their_source_commits():
    raw = json.loads(NODES_FILE.read_text(encoding="utf-8"))
    sources = shipped_sources()
    assert {"comfyui_nodes", "kolors_mz_nodes", "comfyui_sampler_names"} <= set(sources)
    for key, src in sources.items():
        assert re.fullmatch(r"[0-9a-f]{40}", src["commit"]), key
        assert src["repository"] in ("comfyanonymous/ComfyUI", "MinusZoneAI/ComfyUI-Kolors-MZ") and src["path"]
    defs = load_object_info()
    assert NEEDED <= set(defs)
    for name, d in defs.items():
        assert raw[name]["source"] in sources, name
        assert d["name"] == name and isinstance(d["output"], list) and isinstance(d["output_node"], bool)
        assert d["input_order"]["required"] == list(d["input"]["required"])
    assert sources["kolors_mz_nodes"]["commit"].startswith("535c9879")
    assert sources["comfyui_nodes"]["commit"].startswith("e60e19b1")


def test_definitions_match_the_source():
    defs = load_object_info()
    ks = defs["KSampler"]["input"]["required"]
    assert ks["cfg"] == ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}]
    assert ks["steps"][1]["min"] == 1 and ks["steps"][1]["max"] == 10000
    assert "ddim" in ks["sampler_name"][0] and "normal" in ks["scheduler"][0]
    assert defs["LoraLoaderModelOnly"]["input"]["required"]["lora_name"] == [[], {"file_list": "loras"}]
    assert defs["MZ_KolorsUNETLoaderV2"]["input"]["required"]["unet_name"][1]["file_list"] == "unet"
    assert defs["MZ_ChatGLM3Loader"]["output"] == ["CHATGLM3MODEL"]
    assert defs["ControlNetApplyAdvanced"]["output"] == ["CONDITIONING", "CONDITIONING"]
    assert defs["SaveImage"]["output_node"] is True and defs["KSampler"]["output_node"] is False


# -- exported workflows -----------------------------------------------------------------

@pytest.mark.parametrize("build", [
    lambda: scene_workflow(**ARGS),
    lambda: scene_workflow(**ARGS, lora_file=None),
    lambda: scene_workflow(**ARGS, cuda_noise=True),
    lambda: controlnet_workflow(**ARGS),
    lambda: controlnet_workflow(**ARGS, preprocessor=None, controlnet_loader="sdxl"),
])
def test_exported_workflows_validate_in_both_formats(build):
    api = build()
    assert validate_workflow(api, files=expected_files()) == []
    ui = to_ui(api)
    assert {"nodes", "links", "groups", "last_node_id", "last_link_id", "version"} <= set(ui)
    assert validate_workflow(ui, files=expected_files()) == []
    back, problems = ui_to_api(ui)
    assert problems == []
    assert {k: v["inputs"] for k, v in back.items()} == {k: v["inputs"] for k, v in api.items()}


def test_scene_workflow_wiring(scene):
    ks = scene[node_of(scene, "KSampler")]["inputs"]
    assert (ks["sampler_name"], ks["scheduler"], ks["denoise"]) == (SAMPLER_NAME, SCHEDULER, 1.0) == ("ddim", "normal", 1.0)
    assert ks["model"] == [node_of(scene, "LoraLoaderModelOnly"), 0]
    lora = scene[node_of(scene, "LoraLoaderModelOnly")]["inputs"]
    assert lora["model"] == [node_of(scene, "MZ_KolorsUNETLoaderV2"), 0]
    assert ks["positive"] == [node_of(scene, "MZ_ChatGLM3_V2", "Prompt"), 0]
    assert ks["negative"] == [node_of(scene, "MZ_ChatGLM3_V2", "Negative prompt"), 0]
    assert scene[node_of(scene, "VAELoader")]["inputs"]["vae_name"] == VAE_FILE
    assert scene[node_of(scene, "MZ_ChatGLM3Loader")]["inputs"]["chatglm3_checkpoint"] == CHATGLM3_FILE
    assert scene[node_of(scene, "MZ_KolorsUNETLoaderV2")]["inputs"]["unet_name"] == UNET_FILE


def test_controlnet_workflow_wiring():
    cn = controlnet_workflow(**ARGS, control_strength=0.7)
    apply_id = node_of(cn, "ControlNetApplyAdvanced")
    ks = cn[node_of(cn, "KSampler")]["inputs"]
    assert (ks["positive"], ks["negative"]) == ([apply_id, 0], [apply_id, 1])
    applied = cn[apply_id]["inputs"]
    assert applied["strength"] == 0.7 and applied["control_net"] == [node_of(cn, "MZ_KolorsControlNetLoader"), 0]
    assert applied["image"] == [node_of(cn, "Canny"), 0]
    assert cn[node_of(cn, "LoadImage")]["inputs"]["image"] == REFERENCE_IMAGE


def test_ui_format_lays_out_left_to_right_with_widgets_in_declared_order(scene):
    ui = to_ui(scene)
    nodes = {n["type"]: n for n in ui["nodes"]}
    assert nodes["KSampler"]["widgets_values"] == [101, "fixed", 50, 4.0, "ddim", "normal", 1.0]
    assert nodes["EmptyLatentImage"]["widgets_values"] == [1024, 768, 1]
    assert nodes["MZ_KolorsUNETLoaderV2"]["pos"][0] < nodes["LoraLoaderModelOnly"]["pos"][0] \
        < nodes["KSampler"]["pos"][0] < nodes["VAEDecode"]["pos"][0] < nodes["SaveImage"]["pos"][0]
    by_id = {n["id"]: n for n in ui["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[src]["outputs"][src_slot]["type"] == kind


def _story_and_records(tmp_path, with_records=True):
    from PIL import Image

    tale = load_story("ink_fox").with_trigger("墨狐")
    settings = dict(tale.settings, lora_scale=0.8)
    records = []
    if with_records:
        s = tale.scenes[0]
        records = [{"index": 1, "prompt": tale.prompt(0), "negative_prompt": tale.negative, "seed": s.seed,
                    "cfg_scale": settings["cfg_scale"], "steps": settings["steps"], "height": settings["height"],
                    "width": settings["width"], "framing": s.framing, "place": s.place, "action": s.action,
                    "file": "scene_01.png", "image": Image.new("RGB", (64, 64), (200, 180, 150))}]
    (tmp_path / "lora_kohya.safetensors").write_bytes(b"")      # the bundle's LoRA (content not read)
    return tale, records, settings


@pytest.mark.parametrize("with_records", [True, False])
def test_written_scene_carries_the_story_scene_exactly(tmp_path, with_records):
    tale, records, settings = _story_and_records(tmp_path, with_records)
    written = write_workflows(tmp_path, tale, records, settings, lora_strength=0.8)
    folder = tmp_path / "comfyui"
    for name in ("scene_01_api.json", "scene_01_controlnet_api.json", "scene_01.json", "scene_01_controlnet.json",
                 "README.md"):
        assert (folder / name).is_file(), name
    assert (folder / REFERENCE_IMAGE).is_file() == with_records
    api = json.loads(written["scene_01_api"].read_text(encoding="utf-8"))
    ks = api[node_of(api, "KSampler")]["inputs"]
    latent = api[node_of(api, "EmptyLatentImage")]["inputs"]
    assert api[node_of(api, "MZ_ChatGLM3_V2", "Prompt")]["inputs"]["text"] == tale.prompt(0)
    assert tale.prompt(0).startswith("墨狐")
    assert api[node_of(api, "MZ_ChatGLM3_V2", "Negative prompt")]["inputs"]["text"] == tale.negative
    assert (ks["seed"], ks["steps"], ks["cfg"]) == (tale.scenes[0].seed, tale.settings["steps"],
                                                    tale.settings["cfg_scale"])
    assert (latent["width"], latent["height"]) == (tale.settings["width"], tale.settings["height"])
    lora = api[node_of(api, "LoraLoaderModelOnly")]["inputs"]
    assert (lora["lora_name"], lora["strength_model"]) == ("lora_kohya.safetensors", 0.8)
    files = expected_files(lora_files=["lora_kohya.safetensors"])
    for name in ("scene_01_api", "scene_01_controlnet_api", "scene_01", "scene_01_controlnet"):
        assert validate_workflow(json.loads(written[name].read_text(encoding="utf-8")), files=files) == [], name
    ui = json.loads(written["scene_01"].read_text(encoding="utf-8"))
    texts = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "MZ_ChatGLM3_V2"]
    assert tale.prompt(0) in texts and tale.negative in texts
    readme = written["readme"].read_text(encoding="utf-8")
    for needle in ("ComfyUI-Kolors-MZ", "models/loras/lora_kohya.safetensors", "models/unet", "models/LLM",
                   "models/vae", "/prompt", "drag", "ddim", "normal"):
        assert needle in readme, needle


def test_bundle_without_a_kohya_lora_gets_base_model_workflows(tmp_path):
    tale, records, settings = _story_and_records(tmp_path)
    (tmp_path / "lora_kohya.safetensors").unlink()
    written = write_workflows(tmp_path, tale, records, settings, lora_strength=None)
    api = json.loads(written["scene_01_api"].read_text(encoding="utf-8"))
    assert "LoraLoaderModelOnly" not in {n["class_type"] for n in api.values()}
    assert validate_workflow(api) == []


def test_braces_in_a_prompt_warn_and_bundled_stories_have_none():
    with pytest.warns(UserWarning, match="random choice"):
        scene_workflow(**dict(ARGS, prompt="a {red|blue} fox"))
    for name in ("ink_fox", "lighthouse_robot"):
        tale = load_story(name)
        assert not any(re.search(r"\{[^{}]*\|", p) for p in tale.prompts() + [tale.negative]), name


# -- the validator rejects broken workflows ---------------------------------------------

def _rename_class(w):
    w[node_of(w, "KSampler")]["class_type"] = "KSamplerr"


def _drop_cfg(w):
    del w[node_of(w, "KSampler")]["inputs"]["cfg"]


def _vae_into_model(w):
    w[node_of(w, "KSampler")]["inputs"]["model"] = [node_of(w, "VAELoader"), 0]


def _missing_node(w):
    w[node_of(w, "VAEDecode")]["inputs"]["vae"] = ["99", 0]


def _bad_slot(w):
    w[node_of(w, "KSampler")]["inputs"]["model"] = [node_of(w, "MZ_KolorsUNETLoaderV2"), 3]


def _cfg_too_high(w):
    w[node_of(w, "KSampler")]["inputs"]["cfg"] = 150.0


def _zero_steps(w):
    w[node_of(w, "KSampler")]["inputs"]["steps"] = 0


def _text_steps(w):
    w[node_of(w, "KSampler")]["inputs"]["steps"] = "50"


def _unknown_sampler(w):
    w[node_of(w, "KSampler")]["inputs"]["sampler_name"] = "ddim_turbo"


def _literal_model(w):
    w[node_of(w, "KSampler")]["inputs"]["model"] = "Kolors"


def _bin_chatglm(w):
    w[node_of(w, "MZ_ChatGLM3Loader")]["inputs"]["chatglm3_checkpoint"] = "chatglm3.bin"


def _no_output(w):
    del w[node_of(w, "SaveImage")]


def _other_lora(w):
    w[node_of(w, "LoraLoaderModelOnly")]["inputs"]["lora_name"] = "someone_else.safetensors"


@pytest.mark.parametrize("mutate, expected", [
    (_rename_class, ["unknown node class 'KSamplerr'"]),
    (_drop_cfg, ["KSampler", "required input 'cfg' is missing"]),
    (_vae_into_model, ["'model'", "expects MODEL", "VAELoader", "which is VAE"]),
    (_missing_node, ["'vae'", "node '99'", "not in the workflow"]),
    (_bad_slot, ["output slot 3", "1 output(s)"]),
    (_cfg_too_high, ["'cfg'", "150.0", "above its maximum 100.0"]),
    (_zero_steps, ["'steps'", "below its minimum 1"]),
    (_text_steps, ["'steps'", "must be an integer"]),
    (_unknown_sampler, ["'sampler_name'", "'ddim_turbo' is not in its list"]),
    (_literal_model, ["'model'", "needs a link to a MODEL output"]),
    (_bin_chatglm, ["'chatglm3_checkpoint'", "ending in 'safetensors'"]),
    (_no_output, ["no output node", "SaveImage"]),
    (_other_lora, ["'lora_name'", "'someone_else.safetensors'", "models/loras", "lora_kohya.safetensors"]),
])
def test_broken_workflows_are_rejected_naming_the_problem(scene, mutate, expected):
    w = copy.deepcopy(scene)
    mutate(w)
    problems = validate_workflow(w, files=expected_files())
    assert len(problems) == 1, problems
    for needle in expected:
        assert needle in problems[0], (needle, problems)
    with pytest.raises(WorkflowError) as err:
        check_workflow(w, files=expected_files())
    assert err.value.problems == problems and problems[0] in str(err.value)


def test_a_missing_lora_file_is_reported_against_the_files_given(scene):
    assert validate_workflow(scene) == []                       # no files given: names are not checked
    problems = validate_workflow(scene, files={"loras": []})
    assert problems == ["node 2 (LoraLoaderModelOnly) input 'lora_name' = 'lora_kohya.safetensors' is not among "
                        "the files for ComfyUI's models/loras folder (have: none)"]


def test_every_problem_is_listed(scene):
    w = copy.deepcopy(scene)
    _cfg_too_high(w)
    _unknown_sampler(w)
    _missing_node(w)
    with pytest.raises(WorkflowError) as err:
        check_workflow(w)
    assert len(err.value.problems) == 3
    assert all(p in str(err.value) for p in err.value.problems)


def test_a_workflow_that_is_not_a_graph_is_rejected():
    assert validate_workflow({})[0].startswith("a workflow in API format")
    assert "has no class_type" in validate_workflow({"1": {"inputs": {}}})[0]


# -- a live /object_info answer ---------------------------------------------------------

LIVE = {   # the shape a running ComfyUI answers at GET /object_info (trimmed to what the test uses)
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["sd_xl_base_1.0.safetensors"], {}]}},
                               "input_order": {"required": ["ckpt_name"]},
                               "output": ["MODEL", "CLIP", "VAE"], "output_is_list": [False] * 3,
                               "output_name": ["MODEL", "CLIP", "VAE"], "name": "CheckpointLoaderSimple",
                               "output_node": False},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}},
                       "output": ["CONDITIONING"], "output_node": False},
    "EmptyLatentImage": {"input": {"required": {"width": ["INT", {"default": 1024, "min": 16, "max": 16384}],
                                                "height": ["INT", {"default": 1024, "min": 16, "max": 16384}],
                                                "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}]}},
                         "output": ["LATENT"], "output_node": False},
    "KSampler": {"input": {"required": {
        "model": ["MODEL"], "seed": ["INT", {"min": 0, "max": 2 ** 64 - 1}], "steps": ["INT", {"min": 1, "max": 10000}],
        "cfg": ["FLOAT", {"min": 0.0, "max": 100.0}], "sampler_name": [["euler", "ddim"]],
        "scheduler": ["COMBO", {"options": ["normal", "karras"]}],          # the newer COMBO spelling
        "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
        "denoise": ["FLOAT", {"min": 0.0, "max": 1.0}]}}, "output": ["LATENT"], "output_node": False},
    "VAEDecode": {"input": {"required": {"samples": ["LATENT"], "vae": ["VAE"]}}, "output": ["IMAGE"],
                  "output_node": False},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                            "hidden": {"prompt": "PROMPT"}}, "output": [], "output_node": True},
}

SDXL = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["1", 1]}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
    "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 5, "steps": 20, "cfg": 7.0,
                                               "sampler_name": "ddim", "scheduler": "normal", "positive": ["2", 0],
                                               "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
    "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "x"}},
}


def test_a_live_object_info_answer_is_used(tmp_path):
    assert validate_workflow(SDXL, object_info=LIVE) == []
    path = tmp_path / "object_info.json"
    path.write_text(json.dumps(LIVE), encoding="utf-8")
    assert validate_workflow(SDXL, object_info=str(path)) == []

    clip_into_model = copy.deepcopy(SDXL)
    clip_into_model["5"]["inputs"]["model"] = ["1", 1]
    (problem,) = validate_workflow(clip_into_model, object_info=LIVE)
    assert "node 5 (KSampler) input 'model' expects MODEL" in problem and "which is CLIP" in problem

    wrong = copy.deepcopy(SDXL)
    wrong["1"]["inputs"]["ckpt_name"] = "missing.safetensors"
    wrong["5"]["inputs"]["scheduler"] = "beta"
    problems = validate_workflow(wrong, object_info=LIVE)
    assert len(problems) == 2
    assert "'missing.safetensors' is not in its list" in problems[0] and "models/checkpoints" in problems[0]
    assert "'beta' is not in its list ['normal', 'karras']" in problems[1]


def test_the_kit_workflow_against_a_comfyui_without_kolors_mz(scene):
    problems = validate_workflow(scene, object_info=LIVE)
    assert any("unknown node class 'MZ_KolorsUNETLoaderV2'" in p for p in problems)
    assert any("unknown node class 'LoraLoaderModelOnly'" in p for p in problems)


def test_a_live_file_list_is_checked_by_membership(scene):
    live = copy.deepcopy(load_object_info())
    live["LoraLoaderModelOnly"]["input"]["required"]["lora_name"] = [["other.safetensors"], {}]
    (problem,) = validate_workflow(scene, object_info=live)
    assert "'lora_kohya.safetensors' is not in its list ['other.safetensors']" in problem
    assert "models/loras" in problem


# -- the UI format ----------------------------------------------------------------------

def test_ui_format_problems_are_found_after_conversion(scene):
    ui = to_ui(scene)
    sampler = next(n for n in ui["nodes"] if n["type"] == "KSampler")
    sampler["inputs"][0]["link"] = None                      # unplug the model
    sampler["widgets_values"][3] = 500.0                     # cfg (after seed, "fixed", steps)
    problems = validate_workflow(ui)
    assert any("required input 'model' is missing" in p for p in problems)
    assert any("'cfg' = 500.0 is above its maximum" in p for p in problems)


def test_ui_editor_only_nodes_are_reported_not_guessed(scene):
    ui = to_ui(scene)
    ui["nodes"].append({"id": 99, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["hi"]})
    assert validate_workflow(ui) == []
    ui["nodes"].append({"id": 100, "type": "Reroute", "mode": 0, "inputs": [], "outputs": []})
    problems = validate_workflow(ui)
    assert len(problems) == 1 and "Reroute" in problems[0] and "Save (API)" in problems[0]


def test_command_line(tmp_path, scene, capsys):
    from kolors_course.comfyui.validate import main

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(scene), encoding="utf-8")
    w = copy.deepcopy(scene)
    _zero_steps(w)
    bad.write_text(json.dumps(w), encoding="utf-8")
    assert main([str(good)]) == 0
    assert main([str(bad)]) == 1
    assert "below its minimum 1" in capsys.readouterr().out


# -- the sampler: how close to DiffSynth's Kolors scheduler -----------------------------

def test_diffsynth_configures_the_kolors_scheduler_as_transcribed():
    from kolors_course.comfyui.schedules import DIFFSYNTH_KOLORS_SOURCE, diffsynth_path

    assert DIFFSYNTH_KOLORS_SOURCE in diffsynth_path("pipelines/sdxl_image.py").read_text(encoding="utf-8")


def test_ddim_normal_has_diffsynths_timesteps_and_nearly_its_sigmas():
    from kolors_course.comfyui.schedules import compare

    for steps, tolerance in ((8, 1e-4), (20, 0.005), (50, 0.011)):
        c = compare(steps, "normal")
        assert c["model_calls"] == (steps, steps)
        assert c["first_timestep"] == (1099, 1099) and c["last_timestep"] == (0, 0)
        assert c["same_unet_timesteps"] == steps and c["starts_from_pure_noise"]
        assert c["max_rel_sigma_diff"] < tolerance, c
    for other in ("simple", "sgm_uniform", "ddim_uniform"):
        c = compare(50, other)
        assert c["same_unet_timesteps"] < 5, c            # a different spacing


def test_comfyui_euler_is_diffsynths_ddim_update():
    import torch

    from kolors_course.comfyui.schedules import diffsynth_scheduler, euler_eps

    steps = 6
    s = diffsynth_scheduler()
    s.set_timesteps(steps)
    sigmas = [((1 - s.alphas_cumprod[int(t)]) / s.alphas_cumprod[int(t)]) ** 0.5 for t in s.timesteps] + [0.0]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
    offsets = torch.randn(steps, 1, 4, 8, 8, generator=gen, dtype=torch.float64)

    def eps_fn(x, i):                   # any deterministic "model": the update rule is what is compared
        return 0.3 * x + 0.5 * offsets[i]

    x = noise.clone()
    for i, t in enumerate(s.timesteps):
        x = s.step(eps_fn(x, i), t.unsqueeze(0), x)
    y = euler_eps(noise.clone(), sigmas, eps_fn)
    assert torch.allclose(x, y, rtol=1e-9, atol=1e-9)
