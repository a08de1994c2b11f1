"""Point-in-time recovery from a base backup and the WAL archive (no Prefect here).

targets    the one recovery target and its recovery_target_* settings
selection  which base backup, on chain.py's recoverable window (choose_base_backup, the refusals)
extract    stream, sha256, zstd, tar into a new data directory, safely
config     recovery.signal and the settings that keep the copy from touching production
spool      the local WAL spool restore_command copies from, filled ahead by the flow
server     start, watch (log and a trusted private socket), stop
workdir    preflight refusals (directory, port, disk, OS user) and the work directory beside the data
recovery   the steps in order, and the report
drill      the PITR drill's canary, checks of the recovered copy, and its .pitr-drill.json record
errors     RecoveryRefused (before any download), ExtractionFailed, RecoveryFailed, PitrDrillFailed
"""
