"""``python -m ip2p.datagen``: see ``ip2p.datagen.cli``."""

from ip2p.datagen.cli import main

raise SystemExit(main())
