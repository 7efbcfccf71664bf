"""README's own-autoencoder snippet runs as written: a plain-Keras model in the paper layout (tfa's
InstanceNormalization where tfa installs) saved with save_weights loads into the package's autoencoder and gives the
same reconstruction."""
import os
import re
import tempfile

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def test_readme_autoencoder_snippet_runs():
    blocks = [b for b in re.findall(r"```python\n(.*?)```", open(README).read(), re.S) if "load_autoencoder" in b]
    assert len(blocks) == 1, "README.md lost its own-autoencoder snippet"
    cwd = os.getcwd()
    try:
        os.chdir(os.path.dirname(README))
        with tempfile.TemporaryDirectory() as d:
            os.chdir(d)
            exec(compile(blocks[0], "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
