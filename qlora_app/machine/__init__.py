"""The machine: the GPU (gpu), the doctor's checks (doctor), pod clouds (pod), the home and cache folders (home),
atomic writes (atomic) and a full disk (disk_full).
"""
