"""Energy the county can settle: counters turned into daily yields, and the daily report.

Owns: the pure accounting over a device's counter series (``counters``: resets, rollovers,
replaced devices, gaps, clock flags), the daily report built from buffer rows (``daily``), the
reading of a buffer file for a local day and the report records kept in it (``source``).
May import: the agent's base modules, ``agent.store`` (row format, read-only access),
``agent.clock`` (sunrise and sunset) and drivers/ (core types). Never the site file
(``agent.config``): the callers pass what a report needs as plain values (``SiteFacts``).

docs/energy.md says what is computed and how a center settles from it.
"""
