# Sourced (. .devrun/mpi-env.sh, from the repository root, or with LQD_DEVRUN set to the
# folder) on a machine without Open MPI: makes pack_openmpi.sh's relocated copy the one that
# mpirun and lqd's ranks use. Open MPI 4.1 takes each installation folder from OPAL_* (its
# "env" installdirs component: the components, help texts and parameter file are found
# there, not under /usr), PMIx from PMIX_*; mpirun starts local ranks itself (no orted, no
# --prefix) and they inherit this environment. Unpacks lib.tar.xz when that has not happened.
lqd_devrun=${LQD_DEVRUN:-$PWD/.devrun}
if [ ! -d "$lqd_devrun/mpi/bin" ] && [ -f "$lqd_devrun/lib.tar.xz" ]; then
    tar -C "$lqd_devrun" -xJf "$lqd_devrun/lib.tar.xz"
fi
if [ ! -x "$lqd_devrun/mpi/bin/orterun" ]; then
    echo "mpi-env.sh: no Open MPI in $lqd_devrun/mpi (was pack_for_gpu.sh run where Open MPI" \
         "is installed?)" >&2
    return 1 2>/dev/null || exit 1
fi
export OPAL_PREFIX="$lqd_devrun/mpi"
export OPAL_EXEC_PREFIX="$OPAL_PREFIX"
export OPAL_BINDIR="$OPAL_PREFIX/bin"
export OPAL_LIBDIR="$lqd_devrun/lib"
export OPAL_PKGLIBDIR="$OPAL_PREFIX/lib/openmpi3"
export OPAL_DATAROOTDIR="$OPAL_PREFIX/share"
export OPAL_DATADIR="$OPAL_PREFIX/share"
export OPAL_PKGDATADIR="$OPAL_PREFIX/share/openmpi"
export OPAL_SYSCONFDIR="$OPAL_PREFIX/etc"
export PMIX_PREFIX="$OPAL_PREFIX"
export PMIX_LIBDIR="$lqd_devrun/lib"
export PMIX_PKGLIBDIR="$OPAL_PREFIX/lib/pmix"
export PMIX_DATADIR="$OPAL_PREFIX/share"
export PMIX_PKGDATADIR="$OPAL_PREFIX/share/pmix"
export PMIX_SYSCONFDIR="$OPAL_PREFIX/etc"
# Debian's pmix-mca-params.conf names /usr/lib/x86_64-linux-gnu/pmix2/lib/pmix: this wins over it
export PMIX_MCA_mca_base_component_path="$OPAL_PREFIX/lib/pmix"
export PATH="$OPAL_BINDIR:$PATH"
export LD_LIBRARY_PATH="$lqd_devrun/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
