"""The Code domain: HumanEval/MBPP-style function tasks and stdin/stdout tasks, graded in sandboxes.

- `tasks`: the JSONL task format and its validating loader (`load_tasks`, `load_samples`);
- `generator`: seeded synthetic function tasks at adjustable difficulty (`generate`);
- `verify`: `grade_completion(pool, task, completion)` in a real sandbox, `PoolClient` (local pool, Ray actor
  handle or router);
- `env`: `CodeEnv`, the `Env` of this domain;
- `grade` (module): `python -m envs.code.grade --tasks T.jsonl --solutions S.jsonl`.
"""

from envs.code.env import CodeConfig, CodeEnv, extract_code
from envs.code.generator import generate
from envs.code.tasks import SAMPLES_PATH, CodeTask, TaskFormatError, load_samples, load_tasks, parse_task
from envs.code.verify import FAILURES, PoolClient, code_profile, grade_completion

__all__ = ["CodeConfig", "CodeEnv", "CodeTask", "FAILURES", "PoolClient", "SAMPLES_PATH", "TaskFormatError",
           "code_profile", "extract_code", "generate", "grade_completion", "load_samples", "load_tasks", "parse_task"]
