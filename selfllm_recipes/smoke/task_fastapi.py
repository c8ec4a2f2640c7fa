"""Smoke check of task `fastapi`: upstream's legacy API over HTTP."""
from __future__ import annotations

import requests

from .checks import SmokeCheck, SmokeSession, expect, start_on_smoke_model


def verify_fastapi(session: SmokeSession) -> str:
    body = {"prompt": "你好，请介绍一下你自己", "history": [], "max_length": 24, "top_p": 0.8, "temperature": 0.7}
    answer = requests.post(session.base_url + "/", json=body, timeout=120)
    expect(answer.status_code == 200, f"POST / answered HTTP {answer.status_code}: {answer.text[:200]}")
    data = answer.json()
    missing = {"response", "history", "status", "time"} - data.keys()
    expect(not missing, f"POST / response lacks {sorted(missing)}")
    expect(isinstance(data["response"], str) and data["response"].strip() != "", "POST / gave an empty response")
    expect(data["status"] == 200 and isinstance(data["history"], list) and len(data["history"]) == 1,
           f"POST / gave status={data['status']!r}, history={data['history']!r}")
    return f"POST / answered {len(data['response'])} chars"


CHECK = SmokeCheck(command=start_on_smoke_model(), verify=verify_fastapi)
