"""Run as: python -m launcher run jobs/demo.yaml --local"""

from launcher.cli import main

raise SystemExit(main())
