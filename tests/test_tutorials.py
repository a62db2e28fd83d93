"""The tutorials run top to bottom, headless, in their small setting (MS_DIFFUSION_TUTORIAL=small)."""
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(p.name for p in TUTORIALS.glob("*.ipynb"))


def _fashion_mnist_available() -> bool:
    from ms_diffusion.data import DataNotFoundError
    from ms_diffusion.data.fashion_mnist import locate_fashion_mnist

    try:
        locate_fashion_mnist(download=False)
    except DataNotFoundError:
        return False
    return True


def test_every_tutorial_is_collected():
    assert {"ddpm_fashion_mnist.ipynb", "samplers.ipynb", "latent_diffusion.ipynb", "text_to_image.ipynb"} <= set(NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_tutorial_runs_headless(name, tmp_path, monkeypatch):
    if not _fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
    monkeypatch.setenv("MS_DIFFUSION_TUTORIAL", "small")
    monkeypatch.setenv("MS_DIFFUSION_TUTORIAL_OUT", str(tmp_path / "out"))
    # the kernel imports this checkout even where the package is not installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TUTORIALS.parent), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: commit it without outputs"
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} drew no figure"
