"""ComfyUI workflows for the kit's Kolors LoRA and story, checked against the real node definitions.

- ``nodes.json``: the definitions (ComfyUI's ``/object_info`` shape) of every node the
  workflows use, transcribed from ComfyUI's and Kolors-MZ's source, with the commits.
- ``workflows``: the scene and ControlNet workflows in ComfyUI's API format (what
  ``/prompt`` accepts) and the editor's UI format, and ``write_workflows`` for a bundle.
- ``validate``: ``validate_workflow`` / ``check_workflow`` against the shipped definitions
  or a live ComfyUI's ``/object_info`` answer.
- ``schedules``: how ComfyUI's ``ddim`` + ``normal`` compares with DiffSynth's Kolors scheduler.

Nothing here imports torch or ComfyUI except ``schedules``.
"""
from kolors_course.comfyui.validate import (WorkflowError, check_workflow, load_object_info,
                                            validate_workflow)
from kolors_course.comfyui.workflows import (controlnet_workflow, scene_workflow, to_ui,
                                             write_workflows)

__all__ = ["WorkflowError", "check_workflow", "validate_workflow", "load_object_info",
           "scene_workflow", "controlnet_workflow", "to_ui", "write_workflows"]
