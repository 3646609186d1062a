"""`modelprint experiment`: the paper's Table 1 (``paper``) and the attack suite (``attacks``), run
through the real system: gateway, inference workers, PostgreSQL, operator API and suspect scans."""
