"""The published JSON Schema of the job input, generated from the pydantic models.

    python -m finetune_worker.contract.schema > docs/job-input.schema.json
"""

from __future__ import annotations

import json

from finetune_worker.contract.job import MODE_FIELDS, READING_MODES, TRAINING_REQUIRED, JobInput


def job_input_schema() -> dict:
    schema = JobInput.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "finetune-worker job input (RunPod job[\"input\"])"
    schema["properties"]["args"]["description"] = (
        "An Axolotl config: any option `axolotl train` accepts (https://docs.axolotl.ai/docs/config-reference.html). "
        "The worker validates it with Axolotl's own schema and its own rules; see docs/job-reference.md."
    )
    # Which fields each mode needs and allows (the worker checks the same: contract/job.py mode_problems).
    reading = {mode: {"if": {"properties": {"mode": {"const": mode}}, "required": ["mode"]},
                      "then": {"propertyNames": {"enum": sorted(MODE_FIELDS[mode])},
                               "required": [] if mode == "runs" else ["run_id"]}}
               for mode in READING_MODES}
    training = {"if": {"properties": {"mode": {"enum": list(READING_MODES)}}, "required": ["mode"]},
                "else": {"required": list(TRAINING_REQUIRED)}}
    schema["allOf"] = [training, *reading.values()]
    return schema

def render() -> str:
    return json.dumps(job_input_schema(), indent=2, sort_keys=True) + "\n"

if __name__ == "__main__":
    print(render(), end="")
