#!/bin/sh
cd "/usr/local/mesh_services/meshagent/"
exec "./meshagent" --installedByUser=0
