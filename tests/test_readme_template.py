"""The README's "Add a method" template is real code: registered as written, it trains end to end."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN = '''
import sys
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from kdexp import config_dir
from kdexp.train import run

with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
    cfg = compose("config", overrides=["student=cnn", "student.args.channels=[8,8,8]", "teacher.args.channels=[8,8,8]",
                                       "epochs=1", "teacher.epochs=1", "progress=false", "hardware=cpu",
                                       "paths.cache_dir=" + sys.argv[2]])
with open_dict(cfg):
    cfg.method = OmegaConf.structured(CosHintConfig)
run(cfg, sys.argv[1])
'''


@pytest.mark.slow  # subprocesses end to end (~10 s): with the slow tests
def test_the_add_a_method_template_trains(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    template = readme.split("## Add a method", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "template.py"
    script.write_text(template + RUN)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(tmp_path / "cache")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "done" and m["hparams"]["method.name"] == "cos_hint"
    assert 0 < m["history"][0]["train/loss_cos"] < 2  # 1 - cosine similarity, times beta = 1
