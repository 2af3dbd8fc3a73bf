from tunebus.shared.service import run

from .app import NAME, build

run(NAME, build)
