from dorat.cli import main

raise SystemExit(main())
