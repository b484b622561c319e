"""Build script: metadata lives in setup.cfg; this file only installs the
``easyedit_replay_autoload.pth`` start-up hook into site-packages (purelib), for
``pip install .`` (wheel) and ``pip install -e .`` (PEP 660 editable wheel) alike.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "easyedit_replay_autoload.pth"


class build_py_with_pth(build_py):
    """``build_py`` that also puts the ``.pth`` file at the root of the wheel."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            # editable_wheel writes the wheel from install_lib (the unpacked wheel);
            # build_lib is a throw-away folder there.
            dest = Path(self.get_finalized_command("install").install_lib)
        else:
            dest = Path(self.build_lib)
        dest.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(Path(__file__).resolve().parent / PTH), str(dest / PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(str(Path(self.build_lib) / PTH))
        return outputs


setup(cmdclass={"build_py": build_py_with_pth})
