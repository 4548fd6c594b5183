from ocp_agentd.daemon import main

raise SystemExit(main())
